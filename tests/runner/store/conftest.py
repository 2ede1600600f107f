"""The storage fixtures (s3_server, hub_server) live in the plugin module tests.runner.store.fixtures, so other
test dirs can load them too (`pytest_plugins` at the top level, or `-p tests.runner.store.fixtures`). This loads
the plugin for tests/runner/store when nothing else did."""
from __future__ import annotations

PLUGIN = "tests.runner.store.fixtures"


def pytest_configure(config):
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
