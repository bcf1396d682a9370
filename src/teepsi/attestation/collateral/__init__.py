"""Quote collateral: reading it, fetching it, caching it, refusing rollbacks.

One concept per module:

* :mod:`.documents`: the documents of a collateral set and their dates;
* :mod:`.rollback`: the per-platform rollback state (:class:`CollateralFreshness`);
* :mod:`.qcnl`: Intel's QCNL configuration (where collateral comes from);
* :mod:`.platform`: which collateral a quote needs;
* :mod:`.endpoints`: the PCCS API's URLs, built without a network;
* :mod:`.pccs`: the PCCS client, the one place that touches the network;
* :mod:`.cache`: the cache of collateral for one's own quote;
* :mod:`.sources`: the :class:`CollateralSource` interface and its implementations;
* :mod:`.mock`: a source for tests.

Verification (:mod:`teepsi.attestation.verify`) imports none of this: it takes
collateral as an argument.
"""

from teepsi.attestation.collateral.cache import CacheStats, CollateralCache
from teepsi.attestation.collateral.documents import (
    COLLATERAL_KEYS,
    CollateralInfo,
    CollateralItem,
    describe_collateral,
    describe_expired_at,
    load_collateral_file,
    validate_collateral,
)
from teepsi.attestation.collateral.endpoints import PccsEndpoints
from teepsi.attestation.collateral.errors import CollateralError, CollateralRollbackError
from teepsi.attestation.collateral.pccs import PccsCertificateError, PccsClient, fetch_collateral
from teepsi.attestation.collateral.platform import QuotePlatform, quote_platform
from teepsi.attestation.collateral.qcnl import (
    DEFAULT_QCNL_PATH,
    PccsSettings,
    PccsUrlMissing,
    QcnlConfig,
    pccs_settings,
)
from teepsi.attestation.collateral.rollback import (
    FRESHNESS_TOLERANCE_SECONDS,
    CollateralFreshness,
    default_state_path,
)
from teepsi.attestation.collateral.sources import (
    CachedSource,
    CollateralSource,
    FileSource,
    PccsSource,
    SimulatedSource,
    StapledSource,
    collateral_for_quote,
)

__all__ = [
    "COLLATERAL_KEYS",
    "DEFAULT_QCNL_PATH",
    "FRESHNESS_TOLERANCE_SECONDS",
    "CacheStats",
    "CachedSource",
    "CollateralCache",
    "CollateralError",
    "CollateralFreshness",
    "CollateralInfo",
    "CollateralItem",
    "CollateralRollbackError",
    "CollateralSource",
    "FileSource",
    "PccsCertificateError",
    "PccsClient",
    "PccsEndpoints",
    "PccsSettings",
    "PccsSource",
    "PccsUrlMissing",
    "QcnlConfig",
    "QuotePlatform",
    "SimulatedSource",
    "StapledSource",
    "collateral_for_quote",
    "default_state_path",
    "describe_collateral",
    "describe_expired_at",
    "fetch_collateral",
    "load_collateral_file",
    "pccs_settings",
    "quote_platform",
    "validate_collateral",
]
