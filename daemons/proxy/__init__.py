"""The egress proxy: one mitmproxy per project, one door per bottle (control.py, host side),
the fence itself (addon.py, inside mitmproxy), the rules format (rules.py) and the CA (ca.py)."""
