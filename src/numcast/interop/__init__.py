"""Models out: numcast's codes and scales in the layouts other tools read (GGUF for llama.cpp, ...)."""
