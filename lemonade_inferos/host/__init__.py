"""The Lemonade-compatible host: app factory, OpenAI and Lemonade routes, model manager, generate."""
