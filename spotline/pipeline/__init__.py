"""The whole pipeline run from the application: ``supervisor`` (`spotline up`: Redis plus one
supervised worker process per stage, and ``LocalPipeline`` for commands that need one for a
while), ``reference`` (the same stage code in this process, no Redis) and ``demo`` (`spotline
demo`)."""
