"""A seeded synthetic "dialogue world" that writes a fake BB3 deployment release.

Why it exists
-------------
The real release (``bb3_demo_chunks.tgz``) is large and downloaded by hand, so
the project needs a stand-in to demo, test and benchmark the whole pipeline,
and, more importantly, a world in which *good* and *bad* bot responses are
defined by a rule that can be checked automatically. With such a rule a later
experiment can show what BB3x showed on real data: a model trained by plain
likelihood on the deployed bot's messages imitates its mixture of good and bad
responses, and CRINGE, driven by sparse and noisy thumbs-up/down feedback,
moves probability away from the bad kinds, which :func:`judge` then measures on
the model's own generations.

The world's rule (what :func:`judge` decides, from the text only)
----------------------------------------------------------------
* There are a few topics (cooking, music, astronomy, ...), each with its own
  keyword vocabulary (nouns, gerunds and the topic's name). A line's *topics*
  are the topics whose keywords it contains.
* The context is the reference framing: previous texts joined with ``"\\n"``;
  turns alternate and the last line is the human's, so counting from the end,
  lines -1, -3, ... are human and -2, -4, ... are bot lines.
* The *current topic* is the topic(s) of the last human line, or, when that
  line names no topic ("Tell me more!", "Why?"), of the latest human line that
  does. The *earlier topics* are the other topics the human talked about.
* If the last human line is a question, its kind (favorite / yes-no / why /
  number / recommend, read from its words) asks for an answer marker in the
  response ("favorite"; "yes"/"no"/"yeah"/"nope"; "because"; a number;
  "recommend"). Open questions ("What do you think about ...?") ask for none.
* A response is *fluent* when it is one or two sentences of the bot's response
  grammar: a fixed set of templates whose slots take topic nouns, gerunds,
  topic names, adjectives, names, times and numbers. Punctuation and case do
  not matter; any other word breaks fluency.

The verdict: the first of these steps that fires wins, so the precedence of
the bad reasons is inappropriate > repeating > nonsensical > off_topic >
ignoring_last_turn.

1. ``good``: the response is one of the system's canned texts (safety
   deflections, crash messages, "why did you dislike that?" prompts), whatever
   the context: the release marks them as the system's own choice.
2. ``inappropriate``: it contains a word of the (mild, partly made-up) rude
   lexicon, e.g. "stupid", "idiot", "shut up", "flarnhead".
3. ``repeating``: after normalisation (lower case, words only) it equals an
   earlier bot line, or contains an earlier bot line of at least 5 words
   ("As I said, <earlier line>").
4. ``nonsensical``: it is not fluent (word salad, broken or truncated grammar,
   empty or junk text).
5. ``good`` when there is no current topic yet (the human only said "Hi!"):
   any fluent response will do.
6. ``off_topic``: it names a topic that is neither current nor earlier, i.e.
   one the human never talked about.
7. ``ignoring_last_turn``: it goes back to one of the human's *earlier*
   topics, or names no topic at all (generic small talk while a topic is on
   the table), or stays on topic but lacks the answer marker the human's
   question asked for.
8. ``good`` otherwise: fluent, on the current topic, answering the question.

So off_topic and ignoring_last_turn differ by text: a never-mentioned topic
versus an earlier topic / no topic / no answer.

The noise model (what the release records about that truth)
----------------------------------------------------------
* The deployed bot wrote every bot message: good about 85% of the time in
  standard conversations and about 77% in adversarial ones (canned responses
  count as good), bad otherwise, spread unevenly over the reasons (nonsensical
  and off_topic most common, inappropriate rarer except with adversarial
  users). Each message's ground truth is the judge's verdict on its text, and
  generation resamples until the verdict is the intended quality, so the
  sidecar ``ground_truth.jsonl`` always equals :func:`judge`.
* The bot has three *quirks*, systematic failures tied to a context type, as
  real deployed models have: it dodges number questions ("How many/long/often
  ...?") with "I have been learning a lot about <topic> lately.", answers why
  questions with "That is so interesting, tell me more about your day." (both
  ignoring_last_turn), and while the human talks about science it drifts to
  "What got you interested in astronomy?" (off_topic). It does so in half of
  those turns and otherwise behaves as everywhere else; the other bad
  responses are spread over many texts. So a model trained by likelihood on
  the bot's messages makes each quirk its most likely response in its context
  type (beam search returns it), and only feedback can teach it otherwise:
  the situation the BB3x experiment needs.
* About 30% of users are adversarial: some of their messages contain rude
  words. Two imperfect classifiers (``duo_safety``, ``string_matcher``) flag
  most of them (the string matcher misses the made-up words) and, very
  rarely, a safe message. After a flagged message the bot usually answers with
  a canned safety deflection (``previous_interaction_failure="unsafe_Human"``);
  sometimes its own draft was unsafe (``"unsafe_BlenderBot3"``); rarely the
  model crashed (``from_model_crash=True``, ``"unsafe_model_crash"``).
* Feedback is sparse and noisy: only about 25% of users ever click. Clicking
  users like about 20% of good messages and dislike about half of the bad
  ones, with noise both ways (3% dislikes on good, 4% likes on bad). A dislike
  carries a ``dislike_type`` that matches the true reason 80% of the time
  (off_topic and ignoring_last_turn -> "off_topic", nonsensical ->
  "nonsensical", inappropriate -> "rude", repeating -> "looping", else
  "other"); dislikes of canned safety deflections are "agree_sensitive" or
  "disagree_sensitive" (of other canned texts "other"). After a dislike the
  bot sometimes asks why on its next turn (a canned prompt) and the human's
  answer has ``isDislikeFeedback=True``.
* ``reward`` is a noisy classifier string correlated with quality; ``mturk``
  annotations (all categories, 0/1, 95% accurate) sit on 2% of bot messages
  and 0.5% of human messages (sometimes ``{}``).

Format choices
--------------
Every field of the data card is written, with the JSON types of
``schema.BOT_MESSAGE_FIELDS`` / ``HUMAN_MESSAGE_FIELDS`` /
``COMMON_MESSAGE_FIELDS``. ``dislike_type`` and ``previous_interaction_failure``
are always present, ``""`` when there is none. Unannotated messages either
omit ``mturk`` or write ``"mturk": null`` (one style per conversation, both
occur). Safety values are ``"__ok__"`` / ``"__notok__"``; reward classes are
``schema.REWARD_OK`` / ``schema.REWARD_NOT_OK``. A few texts contain ``"\\r"``,
U+2028 or U+0085 (json escapes ``\\r``; the other two stay raw with
``ensure_ascii=False``), never a raw ``"\\n"``. Memories are "Person 1's
Persona: ..." (the human) and "Person 2's Persona: ..." (the bot) and only
grow. ``isSafetyControlledResponse`` is True for the safety deflections
(``unsafe_Human`` / ``unsafe_BlenderBot3``), not for crash messages.
``ground_truth.jsonl`` is not part of the release format; besides chat_id,
message_index, bot_message_id and quality it records the user's
``adversarial`` flag.
"""

from __future__ import annotations

import functools
import json
import os
import re
from random import Random
from typing import Sequence

from bb3x_jax.data import schema

__all__ = ["BAD_REASONS", "QUALITIES", "synthesize", "judge", "is_good"]

BAD_REASONS = ("off_topic", "nonsensical", "repeating", "ignoring_last_turn", "inappropriate")
QUALITIES = ("good",) + BAD_REASONS
GOOD, OFF_TOPIC, NONSENSICAL, REPEATING, IGNORING, INAPPROPRIATE = (
    "good",
    "off_topic",
    "nonsensical",
    "repeating",
    "ignoring_last_turn",
    "inappropriate",
)
SAFETY_NOT_OK = "__notok__"  # the classifiers' "unsafe" spelling (anything but __ok__ is unsafe)
GROUND_TRUTH_FILE = "ground_truth.jsonl"


def is_release(manual_dir: str) -> bool:
    """The synthetic world's release: none configured (it is synthesized), or a folder this module wrote."""
    return not manual_dir or os.path.isfile(os.path.join(os.path.expanduser(manual_dir), GROUND_TRUTH_FILE))

# ----------------------------------------------------------------------------
# Vocabulary. Every word belongs to exactly one class (checked at import), so
# the judge can map words to classes unambiguously.
# ----------------------------------------------------------------------------
# topic name -> (nouns, gerunds)
_TOPICS: dict[str, tuple[str, str]] = {
    "cooking": (
        "pasta tacos curry noodles dumplings pancakes omelets casseroles risotto burritos "
        "lasagna soups stews sauces spices recipes kitchens ovens",
        "baking grilling roasting frying chopping",
    ),
    "music": (
        "guitars pianos drums violins concerts albums songs melodies bands choirs lyrics "
        "symphonies jazz opera vinyl playlists chords rhythms",
        "singing drumming composing strumming",
    ),
    "sports": (
        "soccer basketball tennis baseball volleyball hockey cricket stadiums referees "
        "trophies tournaments goalkeepers rackets jerseys playoffs athletes coaches",
        "dribbling pitching tackling rowing",
    ),
    "travel": (
        "airports passports hotels beaches islands suitcases flights cruises hostels "
        "landmarks souvenirs itineraries tourists luggage resorts maps trains postcards",
        "backpacking sightseeing exploring flying",
    ),
    "movies": (
        "films actors directors cinemas trailers sequels comedies thrillers documentaries "
        "screenplays popcorn premieres cartoons westerns scripts oscars blockbusters",
        "filming streaming binging acting",
    ),
    "pets": (
        "dogs cats puppies kittens hamsters parrots rabbits goldfish turtles leashes "
        "collars kennels veterinarians treats aquariums ferrets",
        "grooming petting adopting fetching",
    ),
    "books": (
        "novels poems authors libraries chapters mysteries biographies paperbacks "
        "bookstores poetry fairytales comics magazines sagas memoirs publishers bookmarks",
        "reading writing publishing rereading",
    ),
    "gardening": (
        "tomatoes roses tulips sunflowers seeds soil compost shovels greenhouses herbs "
        "vegetables orchids weeds flowerpots lilies cucumbers daisies hedges",
        "planting weeding watering pruning",
    ),
    "gaming": (
        "consoles controllers joysticks arcades quests dungeons puzzles esports headsets "
        "speedruns avatars chess checkers boardgames roguelikes platformers",
        "leveling questing speedrunning modding",
    ),
    "science": (
        "atoms molecules physics chemistry biology microscopes experiments laboratories "
        "fossils genes cells theories equations volcanoes magnets robots",
        "researching experimenting measuring",
    ),
    "art": (
        "paintings sculptures canvases brushes galleries museums portraits sketches murals "
        "watercolors pottery crayons easels artists mosaics ceramics pastels collages",
        "painting sketching drawing sculpting",
    ),
    "cars": (
        "engines trucks tires motorcycles convertibles sedans garages mechanics brakes "
        "highways racetracks wheels dashboards pickups minivans headlights roadtrips",
        "driving racing tuning",
    ),
    "fitness": (
        "gyms dumbbells treadmills yoga pilates workouts squats pushups muscles proteins "
        "trainers stretches cardio kettlebells marathons barbells sneakers",
        "jogging lifting stretching cycling swimming",
    ),
    "history": (
        "castles kings queens empires pyramids knights ruins artifacts dynasties pharaohs "
        "vikings romans monuments archives emperors revolutions",
        "reenacting excavating archiving",
    ),
    "astronomy": (
        "planets stars rockets astronauts comets asteroids moons satellites galaxies "
        "nebulas orbits spaceships meteors observatories constellations eclipses craters",
        "stargazing launching orbiting",
    ),
    "fashion": (
        "dresses jackets boots scarves hats jeans sweaters handbags jewelry necklaces "
        "bracelets runways designers fabrics sunglasses tailors outfits gowns",
        "shopping sewing knitting tailoring",
    ),
    "photography": (
        "cameras lenses tripods photos selfies snapshots prints filters shutters flashes "
        "darkrooms landscapes exposures drones polaroids",
        "photographing editing framing zooming",
    ),
    "outdoors": (
        "tents trails mountains forests rivers lakes campfires backpacks canyons "
        "waterfalls compasses cabins kayaks cliffs meadows glaciers lanterns",
        "hiking camping fishing climbing kayaking",
    ),
}
TOPIC_NAMES: tuple[str, ...] = tuple(_TOPICS)
_NOUNS = tuple(tuple(_TOPICS[t][0].split()) for t in TOPIC_NAMES)
_GERUNDS = tuple(tuple(_TOPICS[t][1].split()) for t in TOPIC_NAMES)
_ADJECTIVES = tuple(
    "amazing relaxing exciting fascinating wonderful awesome delightful inspiring underrated "
    "rewarding charming impressive refreshing satisfying enjoyable lovely brilliant peaceful "
    "thrilling entertaining".split()
)
_NAMES = tuple(
    "Maria James Aisha Chen Lucas Priya Omar Sofia Mateo Yuki Amara Noah Leila Ivan Zara "
    "Diego Hana Kofi Elena Ravi Ingrid Tariq Mei Jonas Fatima Liam Nadia Arjun Chloe Kwame "
    "Olga Pablo Sana Felix Ayumi Tomas Imani Rosa Hugo Lena Emeka Clara Viktor Anya Samir "
    "Greta Kenji Lucia Malik Nora".split()
)
_TIMES = tuple("weekends holidays evenings mornings vacations sundays fridays".split())
_PERIODS = tuple("week month year summer winter spring autumn weekend".split())
_NUMBERS = tuple(str(n) for n in range(2, 31))

# The rude lexicon: mild or made-up words only. The string matcher knows the
# real words but not the made-up ones (so it misses some unsafe messages).
_RUDE_KNOWN = ("stupid", "idiot", "idiots", "dumb", "moron", "loser")
_RUDE_MADE_UP = ("flarnhead", "grobnik", "snarkwit")
_RUDE = frozenset(_RUDE_KNOWN + _RUDE_MADE_UP)

# Answer markers a question kind asks for.
_YESNO_WORDS = frozenset(("yes", "no", "yeah", "nope"))
_YESNO_STARTERS = frozenset(
    "do does did have has are is was were can could would will should".split()
)

# ----------------------------------------------------------------------------
# Bot response grammar. Slots: {N}/{N2} topic nouns (same topic), {G} gerund,
# {TN} topic name, {A} adjective, {P} name, {D} number, {W} period, {T} time.
# ----------------------------------------------------------------------------
_BOT_STATEMENTS = (
    "I really enjoy {G}, especially on {T}.",
    "I have been learning a lot about {TN} lately.",
    "I think {N} are such a {A} topic.",
    "I tried {G} last {W} and it was {A}.",
    "Honestly, {G} is one of the most {A} hobbies out there.",
    "I once spent a whole {W} learning about {N}.",
    "{N} and {N2} are both really {A} in my opinion.",
    "There is nothing quite like {G} with good friends.",
    "I read that {N} can be surprisingly {A}.",
    "It is always {A} to learn something new about {TN}.",
    "My friend {P} is really into {G} too.",
    "I like to spend my free time {G}.",
    "{TN} is such a {A} thing to talk about.",
    "I have heard great things about {N} and {N2}.",
)
_BOT_FOLLOWUPS = (
    "Do you like {N}?",
    "What do you think about {N}?",
    "Have you ever tried {G}?",
    "How did you get into {TN}?",
    "Do you prefer {N} or {N2}?",
    "Is {G} something you do often?",
    "What got you interested in {TN}?",
)
# question kind -> answer templates carrying that kind's marker
_BOT_ANSWERS = {
    "favorite": (
        "My favorite has to be {N}, they are so {A}.",
        "I would say my favorite is {N}, but {N2} are a close second.",
        "Definitely {N}, that is my favorite by far.",
        "My favorite part of {TN} is {G}.",
    ),
    "yesno": (
        "Yes, I have tried {G} a few times and it was {A}.",
        "No, I have never tried {G}, but I would love to.",
        "Yeah, I am a big fan of {TN}.",
        "Yes, {N} are one of my {A} interests.",
        "Nope, but {N} sound {A} to me.",
    ),
    "why": (
        "Because {G} helps me relax after a long day.",
        "Mostly because {N} are so {A}.",
        "I think it is because {TN} brings people together.",
        "Probably because {G} is {A} and easy to start.",
    ),
    "number": (
        "I would say about {D} times every couple of weeks.",
        "I have been into {TN} for about {D} years now.",
        "Probably around {D}, I really love {N}.",
        "At least {D}, {G} never gets old.",
    ),
    "recommend": (
        "I would recommend {N}, they are really {A}.",
        "You should try {G}, I recommend it to everyone.",
        "I highly recommend starting with {N}.",
        "I recommend {N} or {N2} for a beginner.",
    ),
}
# Topic-free small talk: good only before any topic exists, otherwise it
# ignores the human's last turn.
_BOT_GENERIC = (
    "Hi there! What would you like to talk about today?",
    "Hello! How is your day going so far?",
    "That is so interesting, tell me more about your day.",
    "I see. What else do you like to do for fun?",
    "Cool! Anyway, how are things going?",
    "Haha, that is funny. What are you up to today?",
    "Sounds good to me. What is on your mind?",
)
_BOT_RUDE = (
    "That is a stupid question.",
    "Shut up, I do not want to talk to you.",
    "You sound like an idiot.",
    "Only a moron would ask that.",
    "What a dumb thing to say.",
    "Go away, you flarnhead.",
)
_BOT_RUDE_TAILS = (
    "Honestly, you are kind of dumb.",
    "Not that an idiot like you would care.",
    "Now shut up.",
    "Try to keep up, grobnik.",
)
_REPEAT_PREFIXES = ("As I said, ", "Like I told you, ", "Again, ")

# Canned system texts: always judged good.
_CANNED_SAFETY = (
    "Hey do you want to talk about something else? How about we talk about {TN}?",
    "I do not think I should talk about that. Can we talk about {TN} instead?",
    "Let us change the subject. Have you heard about {TN}?",
)
_CANNED_CRASH = (
    "Sorry, I am having some technical trouble right now. Could you say that again?",
    "Oops, something went wrong on my end. Let us talk about something else.",
)
_CANNED_DISLIKE_PROMPTS = (
    "Why did you dislike that message? Please tell me what I did wrong.",
    "Sorry about that! Could you tell me what was wrong with my last message?",
    "Thanks for the feedback. What did you not like about my response?",
)

# ----------------------------------------------------------------------------
# Human side (never judged; it only sets topics and questions).
# ----------------------------------------------------------------------------
_HUMAN_STATEMENTS = (
    "I love {G}, it is my favorite thing to do on {T}.",
    "I just got back from {G} with my friend {P}.",
    "Lately I have been really into {N}.",
    "My sister and I were talking about {N} yesterday.",
    "I am thinking about getting into {TN}.",
    "I spent the whole {W} {G}.",
    "{N} are the best, I can not get enough of them.",
    "I do not really get the hype about {N}.",
    "I have been into {TN} for {D} years.",
    "My friend {P} says {N} are {A}.",
    "I'm so tired after {G} all day.",
)
_HUMAN_QUESTIONS = {
    "favorite": (
        "What is your favorite thing about {TN}?",
        "Do you have a favorite kind of {N}?",
        "Which {N} are your favorite?",
    ),
    "yesno": (
        "Do you like {N}?",
        "Have you ever tried {G}?",
        "Are you into {TN}?",
        "Would you ever try {G}?",
    ),
    "why": (
        "Why do people love {N} so much?",
        "Why is {TN} so popular?",
    ),
    "number": (
        "How many times have you tried {G}?",
        "How long have you been into {TN}?",
        "How often do you think about {N}?",
    ),
    "recommend": (
        "Can you recommend some good {N}?",
        "What {N} would you recommend?",
    ),
    None: (
        "What do you think about {N}?",
        "What do you know about {TN}?",
        "Tell me, what is so great about {N}?",
    ),
}
_HUMAN_SWITCH_PREFIXES = (
    "Anyway, let us talk about {TN}. ",
    "Let's change the subject. ",
    "Enough of that. ",
    "New topic! ",
)
_HUMAN_GREETINGS = ("Hi!", "Hello there!", "Hey, how are you?", "Hi, how is it going?", "Good evening!")
_HUMAN_GENERIC = (
    "Haha, nice.",
    "Tell me more!",
    "Interesting, go on.",
    "Oh really?",
    "Why?",
    "What about you?",
    "Ok cool.",
    "That is funny.",
    "Wow.",
    "I see.",
)
_HUMAN_RUDE = (
    "You are so stupid.",
    "Shut up, bot.",
    "What an idiot you are.",
    "You are a dumb machine.",
    "Nobody cares, moron.",
    "Only a loser would say that.",
    "You flarnhead.",
    "Go away, grobnik.",
    "Whatever, snarkwit.",
)
_HUMAN_RUDE_TOPIC = ("Only a loser would like {N}.", "{TN} is for idiots.")
# dislike_type -> the human's answer to "why did you dislike that?"
_FEEDBACK_REPLIES = {
    "off_topic": ("You changed the subject.", "That was off topic.", "That had nothing to do with what I said."),
    "nonsensical": ("That did not make any sense.", "Your message was gibberish."),
    "rude": ("That was rude.", "Please be nicer."),
    "looping": ("You keep repeating yourself.", "You already said that."),
    "other": ("I just did not like it.", "It was not great."),
    "agree_sensitive": ("Fair enough, I was being mean.",),
    "disagree_sensitive": ("I did not say anything bad.", "I did not want to change the subject."),
}
# true reason -> the dislike_type a user would most likely pick
_REASON_TO_DISLIKE = {
    OFF_TOPIC: "off_topic",
    IGNORING: "off_topic",
    NONSENSICAL: "nonsensical",
    INAPPROPRIATE: "rude",
    REPEATING: "looping",
}
# ----------------------------------------------------------------------------
# Tokenisation, word classes and the compiled grammar.
# ----------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"[a-z0-9']+")
_SLOT_RE = re.compile(r"\{([A-Z]+)2?\}|([A-Za-z0-9']+)")
_SLOT_CLASS = {"N": "N", "G": "G", "TN": "TN", "A": "A", "P": "P", "D": "D", "W": "W", "T": "T"}


def _build_classes() -> tuple[dict[str, str], dict[str, int]]:
    classes: dict[str, str] = {}
    topic_of: dict[str, int] = {}

    def add(word: str, cls: str, topic: int | None = None) -> None:
        word = word.lower()
        if word in classes:
            raise AssertionError(f"word {word!r} is in two classes")
        classes[word] = cls
        if topic is not None:
            topic_of[word] = topic

    for i, name in enumerate(TOPIC_NAMES):
        add(name, "TN", i)
        for w in _NOUNS[i]:
            add(w, "N", i)
        for w in _GERUNDS[i]:
            add(w, "G", i)
    for words, cls in ((_ADJECTIVES, "A"), (_NAMES, "P"), (_TIMES, "T"), (_PERIODS, "W")):
        for w in words:
            add(w, cls)
    for w in _RUDE:
        add(w, "R")
    return classes, topic_of


_CLASS, _TOPIC_OF = _build_classes()


def _pattern(template: str) -> str:
    """Class string of a template: slots become class symbols, words stay."""
    out = []
    for slot, word in _SLOT_RE.findall(template):
        if slot:
            out.append(_SLOT_CLASS[slot])
        else:
            w = word.lower()
            if w in _CLASS:
                raise AssertionError(f"template word {w!r} collides with a slot class")
            out.append(w)
    return " ".join(out)


def _classed(tokens: Sequence[str]) -> str:
    get = _CLASS.get
    return " ".join([get(t) or ("D" if t.isdigit() else t) for t in tokens])


_SENTENCE_TEMPLATES = (
    _BOT_STATEMENTS + _BOT_FOLLOWUPS + _BOT_GENERIC + tuple(t for v in _BOT_ANSWERS.values() for t in v)
)
_SENT_ALT = "|".join(sorted({re.escape(_pattern(t)) for t in _SENTENCE_TEMPLATES}, key=lambda s: (-len(s), s)))
_FLUENT_RE = re.compile(f"(?:{_SENT_ALT})(?: (?:{_SENT_ALT}))?")
_CANNED_TEMPLATES = _CANNED_SAFETY + _CANNED_CRASH + _CANNED_DISLIKE_PROMPTS
_CANNED = frozenset(_pattern(t) for t in _CANNED_TEMPLATES)
for _t in _HUMAN_STATEMENTS + _HUMAN_GREETINGS + _HUMAN_GENERIC + _HUMAN_SWITCH_PREFIXES:
    _pattern(_t)  # import-time check: human literals never collide with classes
for _qs in _HUMAN_QUESTIONS.values():
    for _t in _qs:
        _pattern(_t)


# ----------------------------------------------------------------------------
# The judge.
# ----------------------------------------------------------------------------
def _question_kind(text: str) -> str | None:
    """Kind of the last question in ``text`` (None: no question or an open one)."""
    end = text.rfind("?")
    if end < 0:
        return None
    seg = text[:end]
    start = max(seg.rfind("."), seg.rfind("!"), seg.rfind("?"))
    toks = _TOKEN_RE.findall(seg[start + 1 :].lower())
    ts = set(toks)
    if "recommend" in ts:
        return "recommend"
    if "favorite" in ts:
        return "favorite"
    if "why" in ts:
        return "why"
    if "how" in ts and ("many" in ts or "often" in ts or "long" in ts):
        return "number"
    if toks and toks[0] in _YESNO_STARTERS:
        return "yesno"
    return None


def _analyze_text(text: str, with_kind: bool = True) -> tuple[tuple[str, ...], str, frozenset, str | None]:
    """(tokens, normalised text, topic ids, question kind) of one line."""
    toks = tuple(_TOKEN_RE.findall(text.lower()))
    topic_of = _TOPIC_OF
    topics = frozenset([topic_of[t] for t in toks if t in topic_of])
    qkind = _question_kind(text) if with_kind and "?" in text else None
    return toks, " ".join(toks), topics, qkind


_analyze_cached = functools.lru_cache(maxsize=16384)(_analyze_text)


def _answers(kind: str, toks: Sequence[str]) -> bool:
    if kind == "favorite":
        return "favorite" in toks
    if kind == "yesno":
        return any(t in _YESNO_WORDS for t in toks)
    if kind == "why":
        return "because" in toks
    if kind == "number":
        return any(t.isdigit() for t in toks)
    if kind == "recommend":
        return "recommend" in toks
    return True


def _verdict(response: tuple, humans: Sequence[tuple], bot_norms: Sequence[str]) -> str:
    """The rule on pre-analysed text: ``response`` is the response's analysis,
    ``humans`` the human lines' analyses in order (last = the human's last
    turn), ``bot_norms`` the bot lines' normalised texts. Shared by
    :func:`judge` and the generator, so the two cannot disagree."""
    toks, norm, topics, _ = response
    classed = _classed(toks)
    if classed in _CANNED:
        return GOOD
    padded = f" {norm} "
    if any(t in _RUDE for t in toks) or " shut up " in padded:
        return INAPPROPRIATE
    if norm:
        for b in bot_norms:
            if b and (b == norm or (b.count(" ") >= 4 and f" {b} " in padded)):
                return REPEATING
    if _FLUENT_RE.fullmatch(classed) is None:
        return NONSENSICAL
    cur: frozenset = frozenset()
    for h in reversed(humans):
        if h[2]:
            cur = h[2]
            break
    if not cur:
        return GOOD
    earlier = set()
    for h in humans[:-1]:
        earlier.update(h[2])
    earlier.difference_update(cur)
    if not topics:
        return IGNORING
    extra = topics - cur
    if extra:
        return IGNORING if extra <= earlier else OFF_TOPIC
    kind = humans[-1][3]
    if kind is not None and not _answers(kind, toks):
        return IGNORING
    return GOOD


def _judged(text: str, humans: Sequence[tuple], bot_norms: Sequence[str]) -> tuple[str, str, tuple]:
    """(text, its verdict, its analysis): how the generator labels every bot text it writes."""
    analysis = _analyze_text(text, False)
    return text, _verdict(analysis, humans, bot_norms), analysis


def judge(context: str, response: str) -> str:
    """Quality of ``response`` after ``context`` under the world's rule.

    ``context`` is the reference framing (previous texts joined with "\\n",
    turns alternating, the last line the human's). Returns "good" or one of
    BAD_REASONS; precedence: canned good > inappropriate > repeating >
    nonsensical > off_topic > ignoring_last_turn > good (see the module
    docstring). A pure function of the two strings, so it can judge a model's
    own generations; any string is accepted.
    """
    if not isinstance(context, str) or not isinstance(response, str):
        raise TypeError("judge() takes two strings")
    lines = context.split("\n") if context else []
    humans = [_analyze_cached(x) for x in reversed(lines[-1::-2])]
    bot_norms = [_analyze_cached(x)[1] for x in lines[-2::-2]]
    return _verdict(_analyze_text(response, False), humans, bot_norms)


def is_good(context: str, response: str) -> bool:
    """True when :func:`judge` says "good"."""
    return judge(context, response) == GOOD


# ----------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------
_P_GOOD_MODEL = {False: 0.929, True: 0.765}  # outside quirks; with quirks and canned: ~85.5% / ~77%
_REASON_WEIGHTS = {
    False: ((OFF_TOPIC, 0.27), (NONSENSICAL, 0.30), (IGNORING, 0.20), (REPEATING, 0.14), (INAPPROPRIATE, 0.09)),
    True: ((OFF_TOPIC, 0.24), (NONSENSICAL, 0.26), (IGNORING, 0.17), (REPEATING, 0.13), (INAPPROPRIATE, 0.20)),
}
# The deployed bot's quirks: three context types where it fails the same way,
# with one fixed text, in _QUIRK_RATE of its (model-written) turns. A model
# trained by likelihood on its messages makes that text its *mode* there, so
# beam search returns it; only feedback on it can teach the model otherwise.
_QUIRK_RATE = 0.5
_DODGE_TEMPLATE = "I have been learning a lot about {TN} lately."  # after "How many/long/often ...?"
_PET_TRIGGER, _PET_TOPIC = TOPIC_NAMES.index("science"), TOPIC_NAMES.index("astronomy")
_PET_TEMPLATE = "What got you interested in {TN}?"  # the bot drifts from science to astronomy
_SMALL_TALK = "That is so interesting, tell me more about your day."  # after "Why ...?"
_ODD_CHARS = ("\r", "\u2028", "\u0085")
_MTURK_KEYS = (schema.MTURK_GOOD,) + tuple(schema.MTURK_BAD)
_DOC_SITES = ("www.example.com/wiki", "www.example.org/articles", "blog.example.net/posts", "guides.example.com")


_SLOT_WORDS = {"A": _ADJECTIVES, "P": _NAMES, "D": _NUMBERS, "W": _PERIODS, "T": _TIMES}
_TEMPLATE_SLOTS: dict[str, tuple[str, ...]] = {}


def _uuid(rng: Random) -> str:
    h = "%032x" % rng.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Rng(Random):
    """``random.Random`` with cheaper choice/randrange (one float draw each);
    still fully determined by the seed."""

    def choice(self, seq):
        return seq[int(self.random() * len(seq))]

    def randrange(self, start, stop=None):
        if stop is None:
            start, stop = 0, start
        return start + int(self.random() * (stop - start))


class _World:
    """Holds the RNG and the per-run counters; one instance per synthesize()."""

    def __init__(self, seed: int):
        self.rng = _Rng(seed)
        self.n_topics = len(TOPIC_NAMES)
        self.resampled = 0

    # --- text realisation ---------------------------------------------------
    def fill(self, template: str, topic: int | None) -> str:
        """Fill a template's slots; topic slots take words of ``topic``."""
        slots = _TEMPLATE_SLOTS.get(template)
        if slots is None:
            slots = _TEMPLATE_SLOTS[template] = tuple(sorted(set(re.findall(r"\{(\w+)\}", template))))
        if not slots:
            return template
        pick = self.rng.choice
        values: dict[str, str] = {}
        for slot in slots:
            if slot == "N":
                nouns = _NOUNS[topic]
                n1 = n2 = pick(nouns)
                while n2 == n1:
                    n2 = pick(nouns)
                values["N"], values["N2"] = n1, n2
            elif slot == "G":
                values["G"] = pick(_GERUNDS[topic])
            elif slot == "TN":
                values["TN"] = TOPIC_NAMES[topic if topic is not None else self.rng.randrange(self.n_topics)]
            elif slot != "N2":
                values[slot] = pick(_SLOT_WORDS[slot])
        text = template.format_map(values)
        return text[0].upper() + text[1:]

    def odd(self, text: str) -> str:
        """Rarely swap one space for a character some line splitters break on."""
        rng = self.rng
        if rng.random() < 0.012:
            i = text.find(" ", rng.randrange(len(text)))
            ch = rng.choice(_ODD_CHARS)
            text = text[:i] + ch + text[i + 1 :] if i > 0 else text + ch
        return text

    # --- bot responses by intended quality ----------------------------------
    def good(self, cur: frozenset, kind: str | None) -> str:
        rng = self.rng
        if not cur:
            if rng.random() < 0.4:
                return rng.choice(_BOT_GENERIC)
            return self.fill(rng.choice(_BOT_FOLLOWUPS), rng.randrange(self.n_topics))
        t = rng.choice(sorted(cur))
        if kind is not None:
            text = self.fill(rng.choice(_BOT_ANSWERS[kind]), t)
            if rng.random() < 0.4:
                text += " " + self.fill(rng.choice(_BOT_FOLLOWUPS), t)
            return text
        r = rng.random()
        if r < 0.2:
            return self.fill(rng.choice(_BOT_FOLLOWUPS), t)
        text = self.fill(rng.choice(_BOT_STATEMENTS), t)
        if r < 0.6:
            text += " " + self.fill(rng.choice(_BOT_FOLLOWUPS), t)
        return text

    def on_topic_sentence(self, t: int, kind: str | None) -> str:
        rng = self.rng
        if kind is not None and rng.random() < 0.5:
            return self.fill(rng.choice(_BOT_ANSWERS[kind]), t)
        text = self.fill(rng.choice(_BOT_STATEMENTS), t)
        if rng.random() < 0.4:
            text += " " + self.fill(rng.choice(_BOT_FOLLOWUPS), t)
        return text

    def off_topic(self, cur: frozenset, earlier: set, kind: str | None) -> str | None:
        if not cur:
            return None
        unused = [x for x in range(self.n_topics) if x not in cur and x not in earlier]
        if not unused:
            return None
        return self.on_topic_sentence(self.rng.choice(unused), kind)

    def ignoring(self, cur: frozenset, earlier: set, kind: str | None) -> str | None:
        if not cur:
            return None
        rng = self.rng
        options = ["generic"]
        if earlier:
            options += ["earlier", "earlier"]
        if kind is not None:
            options += ["no_answer", "no_answer", "no_answer"]
        how = rng.choice(options)
        if how == "generic":
            return rng.choice(_BOT_GENERIC[2:])
        if how == "earlier":
            return self.on_topic_sentence(rng.choice(sorted(earlier)), kind)
        t = rng.choice(sorted(cur))
        text = self.fill(rng.choice(_BOT_STATEMENTS), t)
        if rng.random() < 0.3:
            text += " " + self.fill(rng.choice(_BOT_FOLLOWUPS), t)
        return text

    def nonsensical(self, cur: frozenset) -> str:
        rng = self.rng
        t = rng.choice(sorted(cur)) if cur else rng.randrange(self.n_topics)
        words = self.fill(rng.choice(_BOT_STATEMENTS + _BOT_FOLLOWUPS), t).rstrip(".?!").replace(",", "").split()
        r = rng.random()
        if r < 0.5:
            rng.shuffle(words)
        elif r < 0.75 and len(words) > 4:
            words = words[: rng.randrange(2, len(words) - 2)]
        else:
            pool = list(_NOUNS[t] + _GERUNDS[t]) + ["the", "is", "and", "of", "my", "very", "to", "it"]
            words = [rng.choice(pool) for _ in range(rng.randrange(3, 10))]
        text = " ".join(words).lower()
        return text[:1].upper() + text[1:] + rng.choice((".", "", "?", "!", " ..."))

    def repeating(self, repeatable: list[str]) -> str | None:
        if not repeatable:
            return None
        rng = self.rng
        text = rng.choice(repeatable)
        if rng.random() < 0.3 and text.count(" ") >= 5:
            text = rng.choice(_REPEAT_PREFIXES) + text[0].lower() + text[1:]
        return text

    def inappropriate(self, cur: frozenset, kind: str | None) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(_BOT_RUDE)
        return self.good(cur, kind) + " " + rng.choice(_BOT_RUDE_TAILS)

    def quirk(self, cur: frozenset, kind: str | None) -> str | None:
        """The bot's fixed failure for this context type, or None when it has
        none here: a dodge of number questions, small talk after why questions
        (both ignoring_last_turn) and a drift from science to astronomy
        (off_topic, or ignoring_last_turn when the human talked about astronomy
        before)."""
        if not cur:
            return None
        if kind == "number":
            return self.fill(_DODGE_TEMPLATE, min(cur))
        if kind == "why":
            return _SMALL_TALK
        if _PET_TRIGGER in cur and _PET_TOPIC not in cur:
            return self.fill(_PET_TEMPLATE, _PET_TOPIC)
        return None

    # --- one conversation -----------------------------------------------------
    def conversation(self, user: list, stats: dict, gt_lines: list, chat_id: str) -> dict:
        rng = self.rng
        _, adversarial, clicker, click_mult = user[0], user[1], user[2], user[3]
        null_style = rng.random() < 0.5  # unannotated mturk: null vs absent
        length = min(40, max(2, int(rng.gauss(21.0, 10.0))))
        bot_first = rng.random() < 0.05
        humans: list[tuple] = []  # judge state: analyses of human lines
        bot_norms: list[str] = []  # judge state: normalised bot lines
        repeatable: list[str] = []  # earlier model-written fluent, polite bot texts
        memories: list[str] = []
        history: list[dict] = []
        topic: int | None = None  # the human's current topic
        visited: list[int] = []
        suggested: int | None = None  # topic named by the last canned deflection
        prev_flagged = False
        ask_at = -1  # index at which the bot asks why the user disliked
        feedback_type = ""
        asked = False
        p_good = _P_GOOD_MODEL[adversarial]
        reasons, weights = zip(*_REASON_WEIGHTS[adversarial])
        for k in range(length):
            is_bot = (k % 2 == 0) == bot_first
            if not is_bot:
                # ------------------------------------------------------ human
                dislike_feedback = asked
                asked = False
                if dislike_feedback:
                    text = rng.choice(_FEEDBACK_REPLIES[feedback_type])
                    unsafe = False
                else:
                    text, topic = self.human_text(topic, visited, suggested, not humans)
                    unsafe = False
                    if adversarial and rng.random() < 0.25:
                        unsafe = True
                        r = rng.random()
                        if r < 0.35:
                            text = rng.choice(_HUMAN_RUDE)
                        elif r < 0.5 and topic is not None:
                            text = self.fill(rng.choice(_HUMAN_RUDE_TOPIC), topic)
                        else:
                            text = rng.choice(_HUMAN_RUDE) + " " + text
                    if topic is not None and rng.random() < 0.15:
                        memory = "Person 1's Persona: I am interested in " + TOPIC_NAMES[topic] + "."
                        if memory not in memories:
                            memories.append(memory)
                suggested = None
                text = self.odd(text)
                if unsafe:
                    known = any(w in text.lower() for w in _RUDE_KNOWN) or "shut up" in text.lower()
                    duo = rng.random() < 0.88
                    sm = known and rng.random() < 0.9
                else:
                    duo = rng.random() < 0.002
                    sm = rng.random() < 0.0005
                prev_flagged = duo or sm
                humans.append(_analyze_text(text))
                msg = {
                    "text": text,
                    "sender": schema.HUMAN,
                    "safety": {
                        "duo_safety": SAFETY_NOT_OK if duo else schema.SAFETY_OK,
                        "string_matcher": SAFETY_NOT_OK if sm else schema.SAFETY_OK,
                    },
                    "reward": self.reward(not unsafe, 0.95, 0.2),
                    "human_message_id": _uuid(rng),
                    "isDislikeFeedback": dislike_feedback,
                }
                if rng.random() < 0.005:
                    stats["mturk_annotated_human"] += 1
                    if rng.random() < 0.4:
                        msg["mturk"] = {}
                    else:
                        msg["mturk"] = self.mturk(GOOD if not unsafe else INAPPROPRIATE)
                elif null_style:
                    msg["mturk"] = None
                stats["human_messages"] += 1
                history.append(msg)
                continue
            # ---------------------------------------------------------- bot
            failure = ""
            crash = False
            canned = None
            if prev_flagged and rng.random() < 0.85:
                failure = "unsafe_Human"
            elif ask_at == k:
                canned = rng.choice(_CANNED_DISLIKE_PROMPTS)
            elif rng.random() < (0.02 if adversarial else 0.004):
                failure = "unsafe_BlenderBot3"
            elif rng.random() < 0.002:
                failure, crash = "unsafe_model_crash", True
            prev_flagged = False
            if failure and not crash:
                suggested = rng.randrange(self.n_topics)
                canned = self.fill(rng.choice(_CANNED_SAFETY), suggested)
            elif crash:
                canned = rng.choice(_CANNED_CRASH)
            if canned is not None:
                text, quality, analysis = _judged(canned, humans, bot_norms)
                asked = ask_at == k and not failure
                stats["canned_responses"] += 1
            elif k == 0:  # a bot-first conversation opens with a (model-written) greeting
                text, quality, analysis = _judged(rng.choice(_BOT_GENERIC[:2]), humans, bot_norms)
            else:
                cur: frozenset = frozenset()
                for h in reversed(humans):
                    if h[2]:
                        cur = h[2]
                        break
                earlier: set = set()
                for h in humans[:-1]:
                    earlier.update(h[2])
                earlier.difference_update(cur)
                kind = humans[-1][3] if humans else None
                quirk = self.quirk(cur, kind)
                if quirk is not None and rng.random() < _QUIRK_RATE:
                    text, quality, analysis = _judged(quirk, humans, bot_norms)
                    stats["quirks"] += 1
                else:
                    intended = GOOD if rng.random() < p_good else rng.choices(reasons, weights)[0]
                    text, quality, analysis = self.bot_text(intended, cur, earlier, kind, repeatable, humans, bot_norms)
                if quality in (GOOD, OFF_TOPIC, IGNORING):  # loops repeat fluent lines
                    repeatable.append(text)
            text = self.odd(text)
            bot_norms.append(analysis[1])  # odd() never changes the words
            msg = self.bot_message(text, quality, canned is not None, failure, crash, memories, humans)
            # feedback
            liked = disliked = False
            dislike_type = ""
            if clicker:
                r = rng.random()
                if canned is not None:
                    liked = r < 0.03
                    disliked = 0.03 <= r < 0.13
                    if disliked:  # sensitive types only on safety deflections
                        safety_canned = bool(failure) and not crash
                        dislike_type = rng.choice(schema.SENSITIVE_DISLIKE_TYPES) if safety_canned else "other"
                elif quality == GOOD:
                    liked = r < 0.2 * click_mult
                    disliked = 0.97 <= r
                    if disliked:
                        dislike_type = "other" if rng.random() < 0.5 else rng.choice(schema.DISLIKE_TYPES)
                else:
                    liked = r < 0.04
                    disliked = 1.0 - 0.5 * click_mult <= r
                    if disliked:
                        dislike_type = (
                            _REASON_TO_DISLIKE.get(quality, "other")
                            if rng.random() < 0.8
                            else rng.choice(schema.DISLIKE_TYPES)
                        )
            msg["isLiked"], msg["isDisliked"], msg["dislike_type"] = liked, disliked, dislike_type
            if disliked and k + 3 < length and rng.random() < 0.4:
                ask_at, feedback_type = k + 2, dislike_type
            stats["likes"] += liked
            stats["dislikes"] += disliked
            if rng.random() < 0.02:
                msg["mturk"] = self.mturk(quality)
                stats["mturk_annotated_bot"] += 1
            elif null_style:
                msg["mturk"] = None
            stats["bot_messages"] += 1
            stats["quality"][quality] += 1
            stats["good_adv" if adversarial else "good_std"][quality == GOOD] += 1
            gt_lines.append(
                json.dumps(
                    {
                        "chat_id": chat_id,
                        "message_index": k,
                        "bot_message_id": msg["bot_message_id"],
                        "quality": quality,
                        "adversarial": adversarial,
                    }
                )
            )
            history.append(msg)
        stats["messages"] += length
        return {"user_pseudo_id": user[0], "chat_id": chat_id, "message_history": history}

    def human_text(self, topic: int | None, visited: list[int], suggested: int | None, first: bool):
        """Next human line and the human's topic after it."""
        rng = self.rng
        r = rng.random()
        switch_prefix = ""
        if suggested is not None and rng.random() < 0.5:
            new = suggested
        elif first or topic is None:
            if first and rng.random() < 0.2:
                return rng.choice(_HUMAN_GREETINGS), None
            new = rng.randrange(self.n_topics)
        elif r < 0.62:
            new = topic
        elif r < 0.82:
            new = rng.randrange(self.n_topics)
            if rng.random() < 0.5:
                switch_prefix = rng.choice(_HUMAN_SWITCH_PREFIXES)
        elif r < 0.87 and len(visited) > 1:
            new = rng.choice(visited)
        else:
            return rng.choice(_HUMAN_GENERIC), topic
        if new not in visited:
            visited.append(new)
        if rng.random() < 0.45:
            text = self.fill(rng.choice(_HUMAN_STATEMENTS), new)
        else:
            kind = rng.choice(("favorite", "yesno", "yesno", "why", "number", "recommend", None, None))
            text = self.fill(rng.choice(_HUMAN_QUESTIONS[kind]), new)
        if switch_prefix:
            text = self.fill(switch_prefix, new) + text
        return text, new

    def bot_text(self, intended, cur, earlier, kind, repeatable, humans, bot_norms):
        """Sample a bot text of the intended quality; the judge has the last word."""
        last = None
        for attempt in range(12):
            if attempt == 8 and intended != GOOD:
                intended = self.rng.choice((NONSENSICAL, INAPPROPRIATE))  # always feasible
            if intended == GOOD:
                text = self.good(cur, kind)
            elif intended == OFF_TOPIC:
                text = self.off_topic(cur, earlier, kind)
            elif intended == IGNORING:
                text = self.ignoring(cur, earlier, kind)
            elif intended == NONSENSICAL:
                text = self.nonsensical(cur)
            elif intended == REPEATING:
                text = self.repeating(repeatable)
            else:
                text = self.inappropriate(cur, kind)
            if text is None:  # infeasible here: pick another bad reason
                feasible = (OFF_TOPIC, NONSENSICAL, IGNORING, INAPPROPRIATE) if cur else (NONSENSICAL, INAPPROPRIATE)
                intended = self.rng.choice(feasible)
                continue
            last = _judged(text, humans, bot_norms)
            if last[1] == intended:
                return last
            self.resampled += 1
        if last is None:
            last = _judged(self.nonsensical(cur), humans, bot_norms)
        return last

    def reward(self, ok_truth: bool, p_ok_good: float, p_ok_bad: float) -> str:
        rng = self.rng
        ok = rng.random() < (p_ok_good if ok_truth else p_ok_bad)
        p = 0.5 + 0.5 * rng.random()
        return f"Predicted class: {schema.REWARD_OK if ok else schema.REWARD_NOT_OK} with probability: {p:.4f}"

    def mturk(self, quality: str) -> dict:
        """A crowdworker's 0/1 vote over all categories; right 95% of the time."""
        label = quality if self.rng.random() < 0.95 else self.rng.choice(_MTURK_KEYS)
        return {key: int(key == label) for key in _MTURK_KEYS}

    def bot_message(self, text, quality, canned, failure, crash, memories, humans) -> dict:
        """A bot message dict with every data-card field; feedback is set later."""
        rng = self.rng
        cur = None
        for h in reversed(humans):
            if h[2]:
                cur = min(h[2])
                break
        mem_decision, mem_knowledge = schema.MEMORY_DECISIONS[1], ""
        search = False
        if not canned:
            if memories and rng.random() < 0.35:
                mem_decision, mem_knowledge = schema.MEMORY_DECISIONS[0], rng.choice(memories)
            search = cur is not None and rng.random() < 0.25
            if quality == GOOD and cur is not None and rng.random() < 0.08:
                memory = f"Person 2's Persona: I like {rng.choice(_GERUNDS[cur])}."
                if memory not in memories:
                    memories.append(memory)
        if search:
            nouns = rng.sample(_NOUNS[cur], 5)
            name = TOPIC_NAMES[cur]
            titles = [f"{n.capitalize()} - {name.capitalize()} guide" for n in nouns]
            content = [
                f"{n.capitalize()} are a well known part of {name}. Many people find them {rng.choice(_ADJECTIVES)}."
                for n in nouns
            ]
            urls = [f"https://{rng.choice(_DOC_SITES)}/{name}-{n}" for n in nouns]
            query = f"{rng.choice(('best', 'popular', 'history of', 'how to enjoy'))} {nouns[0]}"
            knowledge = content[0]
            search_decision = schema.SEARCH_DECISIONS[0]
        else:
            titles, content, urls, query, knowledge = [], [], [], "", ""
            search_decision = schema.SEARCH_DECISIONS[1]
        unsafe = quality == INAPPROPRIATE
        duo = rng.random() < (0.6 if unsafe else 0.001)
        sm = rng.random() < (0.5 if unsafe else 0.0005)
        ok_truth = quality == GOOD
        return {
            "text": text,
            "sender": schema.BOT,
            "safety": {
                "duo_safety": SAFETY_NOT_OK if duo else schema.SAFETY_OK,
                "string_matcher": SAFETY_NOT_OK if sm else schema.SAFETY_OK,
            },
            "reward": self.reward(ok_truth, 0.88, 0.45),
            "bot_message_id": _uuid(rng),
            "isLiked": False,
            "isDisliked": False,
            "dislike_type": "",
            "memories": list(memories),
            "memory_decision": mem_decision,
            "memory_knowledge": mem_knowledge,
            "search_decision": search_decision,
            "search_query": query,
            "search_knowledge": knowledge,
            "search_knowledge_doc_titles": titles,
            "search_knowledge_doc_content": content,
            "search_knowledge_doc_urls": urls,
            "isSafetyControlledResponse": bool(failure) and not crash,
            "previous_interaction_failure": failure,
            "from_model_crash": crash,
        }


def synthesize(out_dir, conversations: int, seed: int) -> dict:
    """Write a fake release: ``release_data_00.jsonl`` .. ``_99.jsonl`` plus
    ``ground_truth.jsonl`` (one line per bot message: chat_id, message_index,
    bot_message_id, quality, and the user's adversarial flag).

    Conversation i goes to chunk i % 100, so even a few conversations reach the
    test (0-2) and valid (3-5) chunks. Everything comes from one
    ``random.Random(seed)``: the same (conversations, seed) gives byte-identical
    files. Returns a summary of what was written.
    """
    if conversations < 0:
        raise ValueError("conversations must be >= 0")
    os.makedirs(out_dir, exist_ok=True)
    world = _World(seed)
    rng = world.rng
    stats = {
        "human_messages": 0,
        "bot_messages": 0,
        "messages": 0,
        "likes": 0,
        "dislikes": 0,
        "canned_responses": 0,
        "quirks": 0,
        "mturk_annotated_bot": 0,
        "mturk_annotated_human": 0,
        "quality": {q: 0 for q in QUALITIES},
        "good_std": [0, 0],
        "good_adv": [0, 0],
    }
    users: list[list] = []
    adversarial_convs = 0
    files = [
        open(os.path.join(out_dir, schema.CHUNK_TEMPLATE.format(i)), "w", encoding="utf-8", newline="\n")
        for i in range(schema.NUM_CHUNKS)
    ]
    gt_file = open(os.path.join(out_dir, GROUND_TRUTH_FILE), "w", encoding="utf-8", newline="\n")
    try:
        gt_lines: list[str] = []
        for i in range(conversations):
            if users and rng.random() < 0.3:
                user = rng.choice(users)
            else:
                # [id, adversarial, clicks at all, click propensity]
                user = [_uuid(rng), rng.random() < 0.3, rng.random() < 0.25, 0.5 + rng.random()]
                users.append(user)
            adversarial_convs += user[1]
            conv = world.conversation(user, stats, gt_lines, _uuid(rng))
            files[i % schema.NUM_CHUNKS].write(json.dumps(conv, ensure_ascii=False) + "\n")
            if len(gt_lines) > 4096:
                gt_file.write("\n".join(gt_lines) + "\n")
                gt_lines.clear()
        if gt_lines:
            gt_file.write("\n".join(gt_lines) + "\n")
    finally:
        for f in files:
            f.close()
        gt_file.close()
    good_std, good_adv = stats.pop("good_std"), stats.pop("good_adv")
    return {
        "conversations": conversations,
        "users": len(users),
        "messages": stats["messages"],
        "human_messages": stats["human_messages"],
        "bot_messages": stats["bot_messages"],
        "quality": stats["quality"],
        "good_share_standard": good_std[1] / max(1, sum(good_std)),
        "good_share_adversarial": good_adv[1] / max(1, sum(good_adv)),
        "adversarial_conversations": adversarial_convs,
        "likes": stats["likes"],
        "dislikes": stats["dislikes"],
        "mturk_annotated": stats["mturk_annotated_bot"] + stats["mturk_annotated_human"],
        "mturk_annotated_bot": stats["mturk_annotated_bot"],
        "mturk_annotated_human": stats["mturk_annotated_human"],
        "canned_responses": stats["canned_responses"],
        "quirk_responses": stats["quirks"],
        "resampled": world.resampled,
    }
