"""teepsi: multi-party private set intersection inside an attested enclave.

The public Python API lives in :mod:`teepsi.client` (run a data provider) and
:mod:`teepsi.server` (run the PSI service); :mod:`teepsi.cli` is a thin layer over both.
"""

__version__ = "0.1.0"
