"""The ``keras-llama`` command's entry point.

Importing `keras_llama` imports Keras and JAX (a second or two). A Ctrl-C in that time would
end with a traceback from deep inside an import; here it exits quietly with code 130, as a
Ctrl-C later does (`keras_llama.cli.main` handles those). This module sits outside the package
so that it runs before any of it is imported.
"""

import os
import signal
import sys


def _interrupted(signum, frame):
    sys.stderr.write("\n")
    sys.stderr.flush()
    os._exit(130)  # mid-import: nothing of ours to clean up


def main():
    signal.signal(signal.SIGINT, _interrupted)
    from keras_llama import cli

    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt again
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
