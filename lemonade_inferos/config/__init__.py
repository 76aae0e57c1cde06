"""The bottom configuration layer: the plugin's settings and their layers (``settings.py``), the policy schema
(``policy.py``), config file parsing (``files.py``) and sizes (``sizes.py``). Everything above imports it; it
imports nothing of the package but these modules."""
