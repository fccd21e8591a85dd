"""The machine stamp every quality benchmark records (GPTQ results differ by machine and thread count)."""
from vlmq_export.testing.machine import machine_stamp


def test_machine_stamp_records_threads_and_versions(keep_torch_threads):
    import torch

    torch.set_num_threads(1)
    s = machine_stamp()
    assert s["torch_threads"] == 1 and s["torch"] == torch.__version__
    assert isinstance(s["cpu_count"], int) and s["cpu_count"] >= 1
    assert s["cpu_model"] is None or (isinstance(s["cpu_model"], str) and s["cpu_model"])
