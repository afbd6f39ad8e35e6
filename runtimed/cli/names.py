"""Container names as docker has them: validated, or generated as `adjective_surname`."""

from __future__ import annotations

import random
import re

from runtimed.cli.common import CLIError

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
MAX_NAME = 76  # containerd's identifier limit

# A short selection of docker's lists (moby/pkg/namesgenerator).
ADJECTIVES = (
    "admiring", "adoring", "affectionate", "agitated", "amazing", "angry", "awesome", "beautiful",
    "blissful", "bold", "boring", "brave", "busy", "charming", "clever", "compassionate", "competent",
    "condescending", "confident", "cool", "cranky", "crazy", "dazzling", "determined", "distracted",
    "dreamy", "eager", "ecstatic", "elastic", "elated", "elegant", "eloquent", "epic", "exciting",
    "fervent", "festive", "flamboyant", "focused", "friendly", "frosty", "funny", "gallant", "gifted",
    "goofy", "gracious", "great", "happy", "hardcore", "heuristic", "hopeful", "hungry", "infallible",
    "inspiring", "intelligent", "interesting", "jolly", "jovial", "keen", "kind", "laughing", "loving",
    "lucid", "magical", "modest", "musing", "mystifying", "naughty", "nervous", "nice", "nifty",
    "nostalgic", "objective", "optimistic", "peaceful", "pedantic", "pensive", "practical", "priceless",
    "quirky", "quizzical", "recursing", "relaxed", "reverent", "romantic", "sad", "serene", "sharp",
    "silly", "sleepy", "stoic", "strange", "stupefied", "suspicious", "sweet", "tender", "thirsty",
    "trusting", "unruffled", "upbeat", "vibrant", "vigilant", "vigorous", "wizardly", "wonderful",
    "xenodochial", "youthful", "zealous", "zen",
)  # fmt: skip
SURNAMES = (
    "agnesi", "albattani", "allen", "almeida", "archimedes", "ardinghelli", "aryabhata", "austin",
    "babbage", "banach", "bardeen", "bartik", "bassi", "bell", "benz", "bhabha", "bhaskara", "blackwell",
    "bohr", "booth", "borg", "bose", "boyd", "brahmagupta", "brattain", "brown", "carson", "cerf",
    "chandrasekhar", "chaplygin", "chatelet", "chatterjee", "clarke", "cohen", "colden", "cori", "cray",
    "curie", "darwin", "davinci", "dijkstra", "dubinsky", "easley", "edison", "einstein", "elion",
    "engelbart", "euclid", "euler", "faraday", "feistel", "fermat", "fermi", "feynman", "franklin",
    "galileo", "gates", "goldberg", "goldstine", "goodall", "gould", "hamilton", "hawking", "heisenberg",
    "hermann", "hertz", "hodgkin", "hoover", "hopper", "hugle", "hypatia", "jackson", "jang", "jennings",
    "johnson", "joliot", "kalam", "keller", "kepler", "khorana", "kilby", "knuth", "kowalevski",
    "lalande", "lamarr", "lamport", "leakey", "leavitt", "lehmann", "lewin", "lichterman", "liskov",
    "lovelace", "lumiere", "mahavira", "margulis", "mayer", "mccarthy", "mcclintock", "meitner",
    "mendel", "merkle", "minsky", "mirzakhani", "morse", "napier", "nash", "neumann", "newton",
    "nobel", "noether", "northcutt", "noyce", "pare", "pascal", "pasteur", "payne", "perlman", "pike",
    "poincare", "ptolemy", "raman", "ramanujan", "ride", "ritchie", "roentgen", "rosalind", "saha",
    "sammet", "shannon", "shaw", "shockley", "sinoussi", "snyder", "spence", "stonebraker",
    "sutherland", "swanson", "swartz", "tesla", "thompson", "torvalds", "turing", "varahamihira",
    "villani", "wescoff", "wilbur", "wiles", "williams", "wilson", "wing", "wozniak", "wright", "yalow",
    "yonath",
)  # fmt: skip


def generate_name(rng: random.Random | None = None) -> str:
    """A docker-like name, e.g. `focused_turing` (never `boring_wozniak`, as in docker)."""
    rng = rng or random.SystemRandom()
    while True:
        name = f"{rng.choice(ADJECTIVES)}_{rng.choice(SURNAMES)}"
        if name != "boring_wozniak":
            return name


def validate_name(name: str) -> str:
    """The name if docker would accept it (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`), else a CLIError."""
    name = name.removeprefix("/")
    if not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME:
        raise CLIError(
            f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, "
            f"at least 2 and at most {MAX_NAME} characters"
        )
    return name
