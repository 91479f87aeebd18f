"""Hello world: GET /fn/hello?name=you"""


def handler(request, ctx):
    name = request.query.get("name", "world")
    ctx.log.info("greeting", name=name)
    return {"hello": name}
