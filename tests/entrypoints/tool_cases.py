"""A function tool shared by the server tests of forced tool calls (its arguments are constrained to
the parameter schema)."""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["C", "F"]}, "hours": {"type": "integer", "minimum": 0, "maximum": 48}},
            "required": ["unit", "hours"],
            "additionalProperties": False,
        },
    },
}
