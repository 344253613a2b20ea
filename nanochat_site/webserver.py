"""The web server: daphne's own command line, with two limits daphne leaves to the application.

1. Websocket messages. daphne refuses a message over `--websocket-max-message-size` (1 MiB by
   default; it bounds the memory one message can take before the application sees it). Its
   websocket library, autobahn, "fails" such a connection by dropping the TCP connection (its
   `failByDrop` option), so the browser saw the socket vanish with no close frame and no reason
   (issue 13). Here the same failure closes the socket properly: a close frame with code 1009
   (message too big) and autobahn's reason ("received WebSocket message size ... exceeds payload
   limit of ..."). Messages under the limit reach the consumers, which refuse frames over
   API_MAX_BODY_BYTES or nested deeper than JSON_MAX_DEPTH with an error frame and keep the
   socket open (nanochat_site/limits.py).

2. Request bodies. daphne (twisted) spools a whole request body to memory or a temporary file
   before the application runs, so Django's own caps (DATA_UPLOAD_MAX_MEMORY_SIZE,
   UPLOAD_MAX_BYTES) only refuse a huge body after it filled the disk. Here a body longer than
   `max_body_bytes()` is refused while it arrives: a declared Content-Length over the cap gets
   413 before a byte of the body is read, and a chunked body is cut off once it passes the cap.

Run it exactly like daphne: `python -m nanochat_site.webserver -b HOST -p PORT app`.
"""

from __future__ import annotations

from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.server import Server
from django.conf import settings

# Room for the multipart framing around uploaded files (boundaries, part headers, form fields).
MULTIPART_SLACK_BYTES = 1024 * 1024


def max_body_bytes() -> int:
    """The largest request body any endpoint accepts: a dataset's uploads plus their framing."""
    return max(settings.API_MAX_BODY_BYTES, settings.UPLOAD_MAX_BYTES) + MULTIPART_SLACK_BYTES


class BoundedRequest(WebRequest):
    """daphne's request, refusing a body over the cap as it arrives instead of spooling it."""

    received = 0
    refused = False

    def gotLength(self, length) -> None:
        super().gotLength(length)
        if length is not None and length > max_body_bytes():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.received += len(data)
        if self.received > max_body_bytes():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self.refused = True
        body = f"request body larger than {max_body_bytes()} bytes\n".encode()
        self.channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.channel.transport.loseConnection()


class BoundedHTTPFactory(HTTPFactory):
    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.requestFactory = BoundedRequest
        return protocol


class WebServer(Server):
    def listen_success(self, port) -> None:
        # Both factories exist by now and no connection has been accepted yet; each connection
        # is built by the HTTP factory's class and copies the websocket factory's options.
        self.ws_factory.setProtocolOptions(failByDrop=False)
        self.http_factory.__class__ = BoundedHTTPFactory
        super().listen_success(port)


class WebServerCommand(CommandLineInterface):
    server_class = WebServer


if __name__ == "__main__":
    WebServerCommand.entrypoint()
