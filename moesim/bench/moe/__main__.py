"""``python -m moesim.bench.moe``: what :func:`moesim.bench.moe.launch` runs on every rank."""

from moesim.bench.moe.driver import main

main()
