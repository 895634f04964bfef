"""The chat channel: a Telegram bot (python-telegram-bot v22) in the daemon's event loop.

- Updates arrive by long polling against ``[intake.chat] base_url``: Telegram's cloud,
  or a self-hosted Bot API server that keeps chat traffic inside the building.
- ``/video <prompt>`` (or any text in a private chat) queues a job and answers with one
  progress message, edited as the worker reports; ``/storyboard <prompt>`` plans the
  scenes at once, and replying ``render`` (or pressing Render) queues exactly those.
- Results go back through the daemon's durable delivery queue, into that progress message.

Only allowlisted users (and, in groups, allowlisted groups) are served; others get one
polite refusal. The bot token never reaches a log. Redis keys live under
``reelqueue:chat:``.

One job per module (this package file imports none of them, so that importing one never
runs the others): ``bot`` (``ChatIntake``: lifecycle, allowlist, routing updates),
``commands``, ``submitting``, ``progress`` (the live progress messages), ``delivery``,
``outbox`` (messages other processes leave for the chat), ``asks`` (who asked, and
replying) and ``texts`` (everything the bot says).
"""
