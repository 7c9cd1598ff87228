"""`make bench`: spp_jax against the libraries people use today (PyTorch, torchvision).

Each benchmark lives in its own module and returns a list of :class:`bench.common.Row`;
``python -m bench.run [--quick] [--device cpu|gpu]`` runs them all in one process
(compilation timings in child processes) and writes ``bench/results/bench.{md,json,png}``.
The pure pieces (config, table writer) import neither torch nor JAX-heavy code.
"""
