"""Bindings from chat platforms' events to engine calls (SPEC §32).

One module per platform, each needing its platform library (an optional extra):
``conversation.platforms.discord`` (``conversation[discord]``, discord.py),
``.slack`` (``conversation[slack]``, slack-bolt's ``AsyncApp``) and ``.telegram``
(``conversation[telegram]``, python-telegram-bot's ``Application``). Each
offers ``Binding(manager, *, bot_user_id=..., room_prefix=...)`` with
``attach(app)`` for the library's own client object and ``handle(event)`` for
one event. The mapping they share lives in ``_mapping``; docs/platforms.md has
the table.
"""
