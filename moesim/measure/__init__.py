"""Micro-benchmarks on the user's GPUs (optional extra ``bench``: torch): all-to-all, p2p, expert FFN, attention,
and the whole MoE layer's kernel pipeline.

``moesim bench a2a --nproc N -o DIR``, ``moesim bench ffn -o DIR`` and ``moesim bench attention -o DIR`` write
the JSON that ``moesim calibrate`` reads (a2a and ffn: the format of ../shared/calibration; attention: the
format of benchmarks/validation/attention_h100, see :mod:`moesim.measure.attention`). ``moesim bench moe -o DIR``
writes ``moe.json``: the MoE layer step by step (:mod:`moesim.measure.moe`; its Triton pipeline is
:mod:`moesim.measure.fused_moe`), which calibrate does not read yet. ``--cpu`` runs them on the CPU with gloo and tiny
shapes, which is how the tests exercise this code.
"""
