"""``python -m moesim.measure.moe``: what :func:`moesim.measure.moe.launch` runs on every rank."""

from moesim.measure.moe.driver import main

main()
