"""The runs tests' users and API clients serve the arena tests too."""

from tests.runs.conftest import alice, api, bob  # noqa: F401 - fixtures
