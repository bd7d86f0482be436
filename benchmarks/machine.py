"""Where and when a benchmark ran, recorded beside its numbers in every result file."""

import datetime
import platform

import torch


def machine() -> dict:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
