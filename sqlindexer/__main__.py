from .cli import cli

# Guarded: decode workers are spawned processes, which import the main module again.
if __name__ == "__main__":
    cli()
