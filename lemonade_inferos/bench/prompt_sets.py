"""The fixed prompt sets of ``inferos bench report``: the design document's two, plus an agent and a RAG set.

Every set yields *items*: one item is what one measured run plays, a list of user turns sent one after the
other in one chat (the reply of each turn stays in the history, as a chat client keeps it). Conversation,
reasoning and RAG items are one turn; an agent item is a GAIA-style conversation of several turns under a
long system prompt with tool descriptions. Runs of the same prompt differ where real traffic differs: an agent
run is a new conversation under the same system prompt; a RAG run asks another question about the same
retrieved passages. Nothing here is random: the same flags give the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass

# the design document's fixed prompts (its BENCHMARK_PROMPTS)
CONVERSATION = ("Hello, how are you today?", "What is artificial intelligence?", "Can you explain machine learning?",
                "Tell me about the weather.", "What are your hobbies?")
REASONING = ("If I have 5 apples and give away 2, how many do I have left?", "What is the capital of France?",
             "Explain the difference between AI and ML.", "How does photosynthesis work?",
             "What causes seasons to change?")
# its GENERATION_CONFIG, in the names the OpenAI/Lemonade API takes (max_new_tokens -> max_tokens)
GENERATION = {"max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repeat_penalty": 1.1, "seed": 42}

AGENT_TOOLS = (
    ("file_search", "List files whose names match a glob pattern.",
     {"pattern": ("string", "a glob such as 'src/**/*.py'"), "directory": ("string", "where to start, default '.'")}),
    ("read_file", "Return the first lines of a text file.",
     {"path": ("string", "a path relative to the project"), "max_lines": ("integer", "at most this many lines")}),
    ("run_python", "Run a short Python snippet in a sandbox and return what it printed.",
     {"code": ("string", "the snippet"), "timeout_s": ("integer", "seconds before it is stopped, default 10")}),
    ("search_docs", "Search the offline documentation of a library and return the best passages.",
     {"query": ("string", "what to look for"), "library": ("string", "python, numpy, pytest, ... default python")}),
    ("calculator", "Evaluate an arithmetic expression exactly.", {"expression": ("string", "e.g. '3 * (4 + 5)'")}),
    ("run_tests", "Run the project's tests with pytest and return the summary.",
     {"selection": ("string", "a test file, a -k expression or empty for all"), "verbose": ("boolean", "-v")}),
    ("git_diff", "Show the uncommitted changes of the project.", {"path": ("string", "limit to this path")}),
    ("open_issue", "Draft an issue for the project's tracker.",
     {"title": ("string", "one line"), "body": ("string", "what happened, what was expected, how to reproduce")}),
)


def _tool_json(name: str, description: str, params: dict[str, tuple[str, str]]) -> str:
    import json

    properties = {k: {"type": t, "description": d} for k, (t, d) in params.items()}
    return json.dumps({"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(params)[:1]}}})


# GAIA's agents: a long system prompt (rules plus every tool's JSON schema) that every turn repeats, short user turns
AGENT_SYSTEM = ("You are GAIA, an assistant that helps a Python developer on their own computer.\n"
                "Rules: answer in at most three sentences; when a tool would help, say which one and with which "
                "arguments; never invent file contents; quote documentation when you use it; if a request is "
                "unclear, ask one question. The user's project is a small command-line tool; its tests run with "
                "pytest and it targets Python 3.11. Keep answers practical: name the module, function or option, "
                "and show at most one short code line.\nYou can call these tools:\n"
                + "\n".join(_tool_json(*tool) for tool in AGENT_TOOLS))
AGENT_ASKS = ("How do I use {topic}? Check the docs first.", "Is there a pitfall with {topic} I should know about?",
              "Write one line of code that shows {topic}.", "Which tool would you call to test {topic} here?")

RAG_QUESTIONS = ("Summarize the passages in two sentences.", "Which statement or function do the passages describe?",
                 "Give one example of using what the passages describe.", "What error can happen here, and when?",
                 "What is the most important rule in these passages?", "Explain the first passage to a beginner.",
                 "What does the last passage add to the first?", "Which keyword is defined here?",
                 "What would change in Python 2?", "List two terms the passages define.")


@dataclass(frozen=True)
class PromptItem:
    """What one run plays: ``turns`` user messages in one chat, under ``system`` when given."""

    set_name: str
    prompt_id: str
    turns: tuple[str, ...]
    system: str | None = None


def _topic_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _excerpt(text: str, chars: int) -> str:
    return " ".join(text.split())[:chars]


def prompt_items(set_name: str, prompt_index: int, run: int, agent_turns: int = 4) -> PromptItem:
    """The item run ``run`` of prompt ``prompt_index`` of ``set_name`` plays (warm-up runs are negative)."""
    if set_name in ("conversation", "reasoning"):
        prompts = CONVERSATION if set_name == "conversation" else REASONING
        return PromptItem(set_name, f"{set_name}-{prompt_index}", (prompts[prompt_index],))
    texts = _topic_texts()
    if set_name == "agent":  # a new conversation each run, about another part of the language
        from pydoc_data.topics import topics

        names = sorted(topics)
        topic = names[(40 + prompt_index * 17 + run * 7) % len(names)]
        turns = tuple(AGENT_ASKS[t % len(AGENT_ASKS)].format(topic=f"'{topic}'") for t in range(agent_turns))
        return PromptItem(set_name, f"agent-{prompt_index}", turns, AGENT_SYSTEM)
    if set_name == "rag":  # the same retrieved passages, another question each run
        passages = "\n\n".join(f"[{i + 1}] {_excerpt(texts[10 + prompt_index * 11 + i], 1300)}" for i in range(3))
        question = RAG_QUESTIONS[run % len(RAG_QUESTIONS)]
        return PromptItem(set_name, f"rag-{prompt_index}", (f"Passages:\n{passages}\n\nQuestion: {question}",),
                          "Answer from the passages only. Cite passage numbers like [1].")
    raise ValueError(f"unknown prompt set {set_name!r}")


SET_SIZES = {"conversation": len(CONVERSATION), "reasoning": len(REASONING), "agent": 3, "rag": 5}
SETS = tuple(SET_SIZES)
