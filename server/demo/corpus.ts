// Text the demo model is built from: the tokenizer is trained on all of it, the base model's
// bigram table is counted over all of it, and each demo adapter leans towards its own style's
// words. Written for this project. The vocabulary is kept small and repeated on purpose: with a
// ~600-token BPE most words then become single tokens, so a bigram model reads as words.

export const BASE_CORPUS: string[] = [
  `The little town is by the sea. In the morning the boats go out on the water, and the sun comes up over the hill. ` +
    `The baker opens the shop, and the town smells of warm bread. ` +
    `People come to the shop for bread and tea, and they talk about the sea and the weather.`,

  `The children walk to school by the water. The old dog walks with the children, and the cat sleeps in the sun. ` +
    `After school the children play by the sea, and the old dog plays with them. ` +
    `In the evening the children go home, and the cat comes home for dinner.`,

  `In the afternoon the wind comes in from the sea, and the sky is grey. ` +
    `The boats come back to the town with fish, and the market is full of people. ` +
    `When the rain comes, the people go into the little cafe, and they drink warm tea and talk about the boats.`,

  `The library is a quiet room on the hill. It has a long table, a green lamp and many old books about the sea and the stars. ` +
    `The old woman in the library knows every book, and she reads to the children in the evening. ` +
    `The children love the old books, and they love the stories about the sea.`,

  `The night is quiet. The lights of the town are on the water, the last boat comes home, and the streets are quiet. ` +
    `The moon comes up over the hill, and the stars are in the sky. ` +
    `The town sleeps, and the sea talks to the stones until the morning comes again.`,

  `Every good day starts with a good plan. In the morning you make a list, and you do the hard things first. ` +
    `You walk in the sun, you drink water, and you help a friend. ` +
    `In the evening you think about the day, and you write down one good thing about it.`,
];

export interface StyleCorpus {
  /** Adapter id (directory name under adapters/). */
  name: string;
  text: string[];
}

export const STYLE_CORPORA: StyleCorpus[] = [
  {
    name: 'pirate',
    text: [
      `Arr, me hearties! The ship be ready, and the captain be on the deck. ` +
        `Hoist the sails, ye dogs, and sail the ship to the treasure island. ` +
        `Aye, the parrot knows the way to the treasure, and the rum be in the ship. ` +
        `Yo ho ho, the sea be our home, and the gold be our treasure, matey!`,
      `Ahoy, matey! The captain be looking for pirates for the ship. ` +
        `Ye will sail the sea, ye will find the treasure, and ye will drink the rum. ` +
        `Arr, the wind be strong, but a pirate be not afraid of the sea. ` +
        `Aye aye, captain! Hoist the flag, sail the ship, and find the gold, me hearties!`,
    ],
  },
  {
    name: 'poet',
    text: [
      `O gentle moon, thy silver light doth fall upon the dreaming sea. ` +
        `The whispering wind doth sing of love, and my heart doth dream of thee. ` +
        `O sweet night, thy silver stars doth shine upon my heart, ` +
        `and every rose doth dream of love beneath the silver moon.`,
      `O my heart, the gentle night doth whisper of thy love. ` +
        `Thy silver dreams doth shine like stars upon the sea, ` +
        `and love, like the endless sea, doth sing beneath the moon. ` +
        `O sweet love, my heart doth dream of thee, and the night doth sing of thee.`,
    ],
  },
  {
    name: 'robot',
    text: [
      `Beep boop. Processing. System status: all systems online. ` +
        `Scanning data. Computing output. Error rate: zero percent. ` +
        `The robot will now execute the task. Beep. Battery level: one hundred percent. ` +
        `Affirmative, human. Data received. Processing complete. Boop.`,
      `Beep beep. System online. Processing data. Scanning the human. ` +
        `The robot computes the output. Output: affirmative. ` +
        `Warning: human detected. Processing. Computing. Task complete. ` +
        `Affirmative, human. System status: online. Beep boop beep.`,
    ],
  },
];
