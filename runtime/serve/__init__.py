"""mrad-serve: one bundle behind HTTP for many cameras, on a Ray Serve application.

:mod:`.http` (requests and answers) needs only the standard library; :mod:`.app`
(the deployment) imports Ray, and :mod:`.cli` imports it only once a command
runs, so the runtime itself never needs the 'serve' extra.
"""

APP_NAME = "mrad"  # serve.get_app_handle(APP_NAME) reaches a running mrad-serve from Python
