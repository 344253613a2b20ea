"""Conversations, the chat websocket, the engine worker and the OpenAI-style API."""
