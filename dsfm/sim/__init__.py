"""The four simulators that write Well-format datasets (and PDEBench's layouts), their presets
and the builder: `python -m dsfm.sim --preset demo --out BASE`. This file makes the folder a
package that setup.py's find_packages installs (without it a wheel had no dsfm.sim)."""
