"""The applications built on the library: ``microspec demo`` (:mod:`.demo`, :mod:`.cli`), its
measurement (:mod:`.measure`), the offline model and data loaders (:mod:`.models`,
:mod:`.data`, :mod:`.frequency`) and ``microspec train-eagle`` (:mod:`.train`).

The library (``microspec_compile`` less this package and ``analysis``) never imports them
(``tests/test_library_layering.py``).
"""
