# Pinned NGC tag: ships Python 3.12, a CUDA build of PyTorch, Transformer
# Engine and apex, none of which can be installed sensibly from PyPI.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/megatron-coe

COPY setup.py README.md ./
COPY megatron_coe ./megatron_coe
COPY configs ./configs
COPY launch ./launch

# Freeze the container's torch / Transformer Engine / apex as constraints so
# that resolving our requirements can never replace them with PyPI wheels.
# megatron-core goes in with --no-deps for the same reason; its dependencies
# are then resolved, under the constraints, by the editable install.
RUN pip list --format=freeze | grep -E '^(torch|transformer.engine|apex)' > /tmp/keep.txt \
 && pip install --no-cache-dir -c /tmp/keep.txt --no-deps megatron-core==0.19.2 \
 && pip install --no-cache-dir -c /tmp/keep.txt -e .

# Megatron's comm/compute overlap relies on the GPU scheduling kernels in the
# order they were launched (a communication kernel queued before a GEMM must
# start first); one hardware work queue per device guarantees that order.
ENV CUDA_DEVICE_MAX_CONNECTIONS=1
ENV PYTHONUNBUFFERED=1

# Fail the build if any of the core imports are broken (e.g. TE missing).
RUN python -c "import megatron_coe, megatron.core, transformer_engine; print('imports ok')"

CMD ["bash"]
