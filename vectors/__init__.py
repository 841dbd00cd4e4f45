"""The data shipped with persona-server: trait definitions (``traits/``), personality inventories
(``inventories/``), the neutral prompt set and the vectors built for the default model.

Installed, this directory is the package ``persona_server_assets``; ``app.settings`` finds it.
"""
