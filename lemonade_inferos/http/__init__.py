"""What both HTTP servers share (the Lemonade host and the control API): the error shape, the OpenAPI
document's error responses, and the request guard that keeps loopback servers loopback."""
