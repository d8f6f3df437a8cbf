"""python -m tasks.manifest --reference | --schema: the README's reference table, or the JSON Schema."""
from __future__ import annotations

import argparse

import tasks.manifest
from tasks.manifest.reference import reference_table, schema_text


def main():
    parser = argparse.ArgumentParser(prog='python -m tasks.manifest',
                                     description=tasks.manifest.__doc__.split('\n\n')[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument('--reference', action='store_true', help="print the README's manifest reference table")
    what.add_argument('--schema', action='store_true', help='print the manifests\' JSON Schema')
    args = parser.parse_args()
    print(reference_table() if args.reference else schema_text(), end='')


if __name__ == '__main__':
    main()
