import os

os.environ.setdefault("MEGATRON_ASCEND_DEVICE", "cpu")
