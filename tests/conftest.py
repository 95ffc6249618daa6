import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/ranks.py
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
