"""Analysis code used by the benchmarks, the demo and the tests (installed with the package).

- :mod:`.coverage`: the vocabulary-policy models (coverage of a policy replayed on
  token streams);
- :mod:`.results`: the machine description and the CSV result files;
- :mod:`.plotting`: the matplotlib (Agg) helpers of the charts.
"""
