"""Running a trained model: the continuous-batching engine, the OpenAI-compatible server, chat
conversations and int8 weights (the commands: sample, chat, serve)."""
