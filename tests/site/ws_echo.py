"""An application that answers each websocket message, or an HTTP request's body, with its
length, for tests of the web server itself (nanochat_site/webserver.py): what happens to a
message or a body is decided before any view or consumer sees it, so no database, session or
channel layer is needed to observe it."""


async def application(scope, receive, send):
    if scope["type"] == "http":
        size = 0
        while True:
            event = await receive()
            size += len(event.get("body", b""))
            if not event.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})
        return
    while True:
        event = await receive()
        if event["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif event["type"] == "websocket.receive":
            data = event.get("text") or event.get("bytes") or ""
            await send({"type": "websocket.send", "text": str(len(data))})
        else:
            return
