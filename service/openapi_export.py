"""Write the API's OpenAPI document as YAML: ``python -m service.openapi_export > openapi.yaml``.

The document depends only on the code (routes and the method registry), never on the
settings, so the committed ``openapi.yaml`` can be checked against it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from service.app import create_app
from service.settings import ServiceSettings


def openapi_document() -> dict[str, object]:
    """The OpenAPI document of the app."""
    app = create_app(ServiceSettings(data_dir=Path("tureen-data"), api_tokens=[]))
    return app.openapi()


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated objects out in full rather than as anchors and aliases."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def openapi_yaml() -> str:
    """The OpenAPI document as YAML text, keys in the document's own order."""
    return yaml.dump(
        openapi_document(),
        Dumper=_PlainDumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )


def main() -> int:
    """Print the document to standard output."""
    sys.stdout.write(openapi_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
