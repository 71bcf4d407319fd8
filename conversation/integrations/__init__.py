"""Optional integrations: the engine behind other frameworks' history interfaces.

Importing this package needs nothing extra; each submodule needs its framework:

- ``conversation.integrations.langchain``: ``EngineChatMessageHistory``, a
  LangChain ``BaseChatMessageHistory`` (extra ``langchain``);
- ``conversation.integrations.openai_agents``: ``EngineSession``, an OpenAI
  Agents SDK ``Session`` (extra ``openai-agents``).

Both read and write through ``ConversationManager``'s public API, so every
guarantee of the engine (cross-worker sync, TTL, cluster) holds for them; each
has a ``from_url`` for sync and async programs alike (``conversation.blocking``).
See ``docs/integrations.md``.
"""
