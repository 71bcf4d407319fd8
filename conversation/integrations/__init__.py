"""Optional integrations: the engine behind other frameworks' history interfaces.

Importing this package needs nothing extra; each submodule needs its framework:

- ``conversation.integrations.langchain``: ``EngineChatMessageHistory``, a
  LangChain ``BaseChatMessageHistory`` (extra ``langchain``);
- ``conversation.integrations.openai_agents``: ``EngineSession``, an OpenAI
  Agents SDK ``Session`` (extra ``openai-agents``).

Both read and write through ``ConversationManager``'s public API only, so every
guarantee of the engine (cross-worker sync, retries, TTL, cluster) holds for them.
See ``docs/integrations.md``.
"""
