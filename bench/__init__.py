"""CPU benchmarks of fcos-d2 against detectron2's own FCOS; run all with ``python -m bench.run_all``."""
