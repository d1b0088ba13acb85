//! Built-in English words for RULER's keys and word lists.
//!
//! RULER draws them from the `wonderwords` package (about 1,500 adjectives, 6,800 nouns and
//! 1,000 verbs) and, for long common-word lists, from a larger English list. Neither ships
//! with this project: these shorter lists are our own, and [`compound`] multiplies them into
//! `adjective-noun` keys the way RULER builds its needle keys.

pub const ADJECTIVES: [&str; 100] = [
    "able", "absent", "agile", "ancient", "angry", "anxious", "aquatic", "awake", "bashful",
    "bitter", "blunt", "bold", "brave", "breezy", "brief", "bright", "brittle", "broad", "busy",
    "calm", "candid", "careful", "cheerful", "chilly", "clever", "cloudy", "clumsy", "coastal",
    "cozy", "crisp", "curious", "damp", "dapper", "daring", "dizzy", "dusty", "eager", "early",
    "earnest", "elegant", "empty", "fancy", "fearless", "fierce", "fluffy", "fragile", "frosty",
    "gentle", "giant", "glossy", "graceful", "grumpy", "hasty", "hollow", "humble", "hungry",
    "icy", "idle", "jolly", "juicy", "keen", "lazy", "lively", "lonely", "loyal", "lucky",
    "massive", "mellow", "merry", "misty", "modern", "narrow", "nervous", "noisy", "odd", "pale",
    "patient", "plain", "polite", "proud", "quiet", "rapid", "rare", "rusty", "sandy", "shiny",
    "silent", "sleepy", "slender", "smooth", "sour", "steep", "sturdy", "subtle", "tidy", "timid",
    "vivid", "wary", "wild", "witty",
];

pub const NOUNS: [&str; 161] = [
    "acorn", "anchor", "apple", "apron", "arrow", "attic", "badger", "balcony", "banjo", "barn",
    "basket", "beacon", "beetle", "bicycle", "blanket", "bottle", "bramble", "bucket", "buffalo",
    "button", "cabin", "cactus", "camel", "candle", "canoe", "canyon", "carpet", "castle",
    "cellar", "chimney", "cinema", "circus", "cliff", "clock", "cobbler", "compass", "cottage",
    "cricket", "crow", "cushion", "dagger", "desert", "diamond", "dolphin", "donkey", "dragon",
    "drum", "eagle", "elbow", "engine", "falcon", "feather", "ferry", "fiddle", "forest",
    "fountain", "fox", "garden", "garlic", "giraffe", "glacier", "goblet", "gravel", "guitar",
    "hammer", "harbor", "hedge", "helmet", "hermit", "hippo", "honey", "hornet", "island",
    "jacket", "jungle", "kettle", "kitten", "ladder", "lagoon", "lantern", "lemon", "library",
    "lizard", "lobster", "magnet", "mango", "marble", "meadow", "mirror", "monkey", "mountain",
    "mushroom", "napkin", "needle", "nickel", "oyster", "paddle", "palace", "panther", "parrot",
    "peach", "pebble", "pelican", "pencil", "pepper", "piano", "pigeon", "pillow", "pirate",
    "planet", "pocket", "potato", "puddle", "pumpkin", "puppet", "quarry", "rabbit", "raft",
    "raven", "ribbon", "river", "rocket", "saddle", "salmon", "sandal", "scarf", "scooter",
    "shovel", "silver", "skillet", "sparrow", "spider", "spoon", "squirrel", "stable", "statue",
    "stove", "sunset", "teapot", "temple", "thimble", "thunder", "tiger", "tomato", "tractor",
    "trumpet", "tulip", "tunnel", "turtle", "umbrella", "valley", "velvet", "violin", "wagon",
    "walnut", "walrus", "whistle", "willow", "window", "wizard", "zebra",
];

pub const VERBS: [&str; 60] = [
    "admire", "argue", "bake", "bounce", "breathe", "build", "carry", "chase", "climb", "collect",
    "cough", "crawl", "dance", "deliver", "dig", "divide", "drift", "explain", "float", "fold",
    "gather", "giggle", "glance", "grumble", "hover", "hunt", "imagine", "inspect", "juggle",
    "kneel", "knit", "laugh", "launch", "listen", "march", "melt", "mumble", "observe", "paint",
    "polish", "pour", "pretend", "quarrel", "relax", "repair", "scatter", "scribble", "shiver",
    "sneeze", "sprinkle", "stumble", "swim", "tremble", "tumble", "wander", "whisper", "wobble",
    "wonder", "wrestle", "yawn",
];

/// Every plain word: the common-word task's list, as RULER pools its nouns, adjectives and
/// verbs.
pub fn plain() -> impl Iterator<Item = &'static str> {
    ADJECTIVES.iter().chain(&NOUNS).chain(&VERBS).copied()
}

/// How many `adjective-noun` compounds there are.
pub const COMPOUNDS: usize = ADJECTIVES.len() * NOUNS.len();

/// The `i`-th `adjective-noun` compound (`i < COMPOUNDS`), RULER's needle-key form.
pub fn compound(i: usize) -> String {
    format!("{}-{}", ADJECTIVES[i / NOUNS.len() % ADJECTIVES.len()], NOUNS[i % NOUNS.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_distinct_lowercase_and_compounds_cover_every_pair() {
        let words: Vec<&str> = plain().collect();
        let distinct: std::collections::BTreeSet<&str> = words.iter().copied().collect();
        assert_eq!(distinct.len(), words.len(), "a word is listed twice");
        assert!(words.iter().all(|w| w.bytes().all(|b| b.is_ascii_lowercase())));
        let compounds: std::collections::BTreeSet<String> = (0..COMPOUNDS).map(compound).collect();
        assert_eq!(compounds.len(), COMPOUNDS);
    }
}
