"""A small bundled demo dataset: toxic vs non-toxic messages in English, French, German and Spanish.

This is DEMO DATA written by mosaic itself from templates (no real users' messages), so the default
experiment runs offline. It is mild on purpose (insults, no slurs) and far easier than real data:
use it to see the pipeline work, not to draw conclusions.
"""

from __future__ import annotations

import random

import pandas as pd

LABEL_NAMES = {0: "non_toxic", 1: "toxic"}

_LEX: dict[str, dict[str, list[str]]] = {
    "en": {
        "toxic": [
            "You are a {bad} {person}, nobody wants you {place}.",
            "Shut up, you {bad} {person}. Your {thing} is garbage.",
            "What a {bad} {person} you are, get lost from {place}.",
            "Only a {bad} {person} would write such stupid {thing}.",
            "I hate you and your {bad} {thing}, you {person}.",
            "Go away {place}, you pathetic {bad} {person}.",
        ],
        "non_toxic": [
            "Thank you for the {good} {thing}, see you {place}!",
            "I really enjoyed your {thing}, it was {good}.",
            "Have a {good} day, my friend, and enjoy {place}.",
            "Your {thing} helped me a lot, that was {good} of you.",
            "Could you share more about the {thing}? It looks {good}.",
            "We met {place} yesterday and it was {good}.",
        ],
        "bad": ["stupid", "worthless", "useless", "disgusting", "brainless", "miserable"],
        "good": ["wonderful", "kind", "helpful", "lovely", "great", "thoughtful"],
        "person": ["idiot", "loser", "clown", "fool", "moron", "creep"],
        "thing": ["post", "comment", "idea", "recipe", "photo", "story"],
        "place": ["here", "in this forum", "at the park", "in the chat", "at school", "online"],
    },
    "fr": {
        "toxic": [
            "Tu es un {person} {bad}, personne ne veut de toi {place}.",
            "Tais-toi, espèce de {person} {bad}. Ton {thing} est nul.",
            "Quel {person} {bad} tu fais, dégage {place}.",
            "Seul un {person} {bad} écrirait un {thing} aussi bête.",
            "Je te déteste, toi et ton {thing} {bad}, sale {person}.",
            "Va-t'en {place}, pauvre {person} {bad}.",
        ],
        "non_toxic": [
            "Merci pour ce {thing} {good}, à bientôt {place} !",
            "J'ai beaucoup aimé ton {thing}, il était {good}.",
            "Bonne journée mon ami, profite bien {place}.",
            "Ton {thing} m'a beaucoup aidé, c'était {good} de ta part.",
            "Peux-tu en dire plus sur ce {thing} ? Il a l'air {good}.",
            "On s'est vus {place} hier et c'était {good}.",
        ],
        "bad": ["stupide", "minable", "inutile", "dégoûtant", "débile", "pitoyable"],
        "good": ["formidable", "gentil", "utile", "charmant", "génial", "attentionné"],
        "person": ["idiot", "crétin", "clown", "imbécile", "abruti", "nul"],
        "thing": ["message", "commentaire", "projet", "dessin", "récit", "article"],
        "place": ["ici", "sur ce forum", "au parc", "dans le chat", "à l'école", "en ligne"],
    },
    "de": {
        "toxic": [
            "Du bist ein {bad} {person}, niemand will dich {place}.",
            "Halt den Mund, du {bad} {person}. Dein {thing} ist Müll.",
            "Was für ein {bad} {person} du bist, verschwinde {place}.",
            "Nur ein {bad} {person} schreibt so einen dummen {thing}.",
            "Ich hasse dich und deinen {bad} {thing}, du {person}.",
            "Hau ab {place}, du erbärmlicher {person}.",
        ],
        "non_toxic": [
            "Danke für den {good} {thing}, bis bald {place}!",
            "Dein {thing} hat mir sehr gefallen, er war {good}.",
            "Hab einen {good} Tag, mein Freund, genieß es {place}.",
            "Dein {thing} hat mir sehr geholfen, das war {good} von dir.",
            "Kannst du mehr über den {thing} erzählen? Er wirkt {good}.",
            "Wir haben uns gestern {place} getroffen und es war {good}.",
        ],
        "bad": ["dummer", "wertloser", "nutzloser", "ekelhafter", "hirnloser", "elender"],
        "good": ["wunderbaren", "netten", "hilfreichen", "schönen", "tollen", "lieben"],
        "person": ["Idiot", "Versager", "Clown", "Trottel", "Depp", "Widerling"],
        "thing": ["Beitrag", "Kommentar", "Vorschlag", "Text", "Bericht", "Artikel"],
        "place": ["hier", "in diesem Forum", "im Park", "im Chat", "in der Schule", "online"],
    },
    "es": {
        "toxic": [
            "Eres un {person} {bad}, nadie te quiere {place}.",
            "Cállate, {person} {bad}. Tu {thing} es basura.",
            "Qué {person} tan {bad} eres, lárgate {place}.",
            "Solo un {person} {bad} escribiría un {thing} tan tonto.",
            "Te odio a ti y a tu {thing} {bad}, {person}.",
            "Vete {place}, {person} patético y {bad}.",
        ],
        "non_toxic": [
            "Gracias por el {thing} tan {good}, ¡nos vemos {place}!",
            "Me encantó tu {thing}, fue {good}.",
            "Que tengas un día {good}, amigo, disfruta {place}.",
            "Tu {thing} me ayudó mucho, fue muy {good} de tu parte.",
            "¿Puedes contar más sobre el {thing}? Parece {good}.",
            "Nos vimos {place} ayer y fue {good}.",
        ],
        "bad": ["estúpido", "inútil", "asqueroso", "miserable", "tonto", "despreciable"],
        "good": ["maravilloso", "amable", "útil", "genial", "bonito", "estupendo"],
        "person": ["idiota", "perdedor", "payaso", "imbécil", "tarado", "bobo"],
        "thing": ["mensaje", "comentario", "proyecto", "dibujo", "relato", "artículo"],
        "place": ["aquí", "en este foro", "en el parque", "en el chat", "en la escuela", "en línea"],
    },
}

DEMO_LANGUAGES = tuple(_LEX)


def demo_dataset(rows_per_class: int = 60, seed: int = 0) -> pd.DataFrame:
    """Deterministic demo rows: columns text, label, language (no split: mosaic makes one)."""
    rng = random.Random(seed)
    records: list[dict[str, object]] = []
    for language, lex in _LEX.items():
        for label, kind in ((1, "toxic"), (0, "non_toxic")):
            seen: set[str] = set()
            attempts = 0
            while len(seen) < rows_per_class and attempts < rows_per_class * 50:
                attempts += 1
                template = rng.choice(lex[kind])
                slots = {k: rng.choice(v) for k, v in lex.items() if k not in ("toxic", "non_toxic")}
                text = template.format(**slots)
                if text not in seen:
                    seen.add(text)
                    records.append({"text": text, "label": label, "language": language})
    return pd.DataFrame.from_records(records)
