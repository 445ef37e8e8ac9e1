"""keyless' benchmark suite: `python -m bench.run [--smoke] [--out DIR]`.

See docs/benchmarks.md.
"""
