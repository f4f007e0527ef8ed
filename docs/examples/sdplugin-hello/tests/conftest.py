pytest_plugins = ["sdcore.testing"]
