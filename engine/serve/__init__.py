"""OpenAI-compatible serving on Ray Serve: typed app config, protocol models, ingress and engine deployments.

``serve_app.py`` at the repository root builds the application from these parts.
"""
