"""teco_ssm: long-horizon, action-conditioned video world models in the TECO style.

The temporal model is chosen by name among `transformer`, `s5`, `convs5` and `convt3`
(`teco_ssm.backbones.build`); the three SSMs share one scan kernel (`teco_ssm.scan`).
"""

__version__ = "0.1.0"
