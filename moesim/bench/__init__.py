"""Micro-benchmarks on the user's GPUs (optional extra ``bench``: torch): all-to-all, p2p, expert FFN.

``moesim bench a2a --nproc N -o DIR`` and ``moesim bench ffn -o DIR`` write the JSON that
``moesim calibrate`` reads (the format of ../shared/calibration). ``--cpu`` runs them on the CPU with
gloo and tiny shapes, which is how the tests exercise this code.
"""
