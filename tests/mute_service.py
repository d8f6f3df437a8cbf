"""A service that takes connections on the port it records and says nothing: what a hung supervisor looks
like from outside. Run as `python -P -m tests.mute_service <state_dir> <name>`."""
import json
import os
import socket
import sys
import time
from pathlib import Path

state_dir, name = Path(sys.argv[1]), sys.argv[2]
listener = socket.create_server(('127.0.0.1', 0))
port = listener.getsockname()[1]
record = state_dir / f'{name}.json'
record.with_suffix('.tmp').write_text(json.dumps({'port': port, 'page_port': port, 'pid': os.getpid()}))
os.replace(record.with_suffix('.tmp'), record)
held = []
deadline = time.monotonic() + 600          # bounded, whoever forgets it
while time.monotonic() < deadline:
    listener.settimeout(1)
    try:
        held.append(listener.accept()[0])   # kept open, never answered
    except TimeoutError:
        pass
