"""BatchNorm folding and structural re-parameterization (`normsurgeon fold-bn`); see docs/batchnorm.md."""
